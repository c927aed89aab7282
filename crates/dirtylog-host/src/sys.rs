//! Raw userfaultfd and `PAGEMAP_SCAN` definitions and thin wrappers. The structs and constants
//! come from `linux-raw-sys` (generated from the kernel's uapi headers); the `PAGEMAP_SCAN`
//! ioctl number and the `UFFDIO_WRITEPROTECT_MODE_*` bits are missing there and are defined
//! here, checked against the uapi layout in a test. Every wrapper maps errno to a
//! [`HostError`]; none dereferences the memory it names.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub(crate) use linux_raw_sys::general::{
    page_region, pm_scan_arg, uffdio_api, uffdio_range, uffdio_register, uffdio_writeprotect,
    _UFFDIO_WRITEPROTECT, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
    UFFDIO_REGISTER_MODE_WP, UFFD_API, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY,
};
pub(crate) use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WRITEPROTECT,
};

use crate::HostError;

/// `_IOWR('f', 16, struct pm_scan_arg)` (`include/uapi/linux/fs.h`).
pub(crate) const PAGEMAP_SCAN: u32 = 0xC060_6610;

/// `UFFDIO_WRITEPROTECT_MODE_WP` (`include/uapi/linux/userfaultfd.h`): set protection (clear
/// it when absent).
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: do not wake threads blocked on the range.
pub(crate) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// Retry a call returning `-1` with `EINTR` (a signal arrived; nothing was done).
fn retry_eintr(mut f: impl FnMut() -> libc::c_long) -> Result<libc::c_long, std::io::Error> {
    loop {
        let r = f();
        if r >= 0 {
            return Ok(r);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `ioctl(fd, req, arg)` with `EINTR` retried.
///
/// # Safety
/// `arg` must point to a live value of the type `req` expects, valid for reads and writes.
unsafe fn ioctl<T>(
    fd: BorrowedFd<'_>,
    req: u32,
    arg: *mut T,
) -> Result<libc::c_long, std::io::Error> {
    // SAFETY: the caller guarantees `arg` is valid for `req`; the fd is open (borrowed).
    retry_eintr(|| unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg) as libc::c_long })
}

/// A new userfaultfd (`O_CLOEXEC`, plus `O_NONBLOCK` when `nonblock`). Faults from the kernel
/// (a `read(2)` into the range) are trapped too when the caller may (root or
/// `CAP_SYS_PTRACE`); otherwise `UFFD_USER_MODE_ONLY` is used, as unprivileged users must.
pub(crate) fn userfaultfd(nonblock: bool) -> Result<OwnedFd, HostError> {
    let mut flags = libc::O_CLOEXEC;
    if nonblock {
        flags |= libc::O_NONBLOCK;
    }
    let open = |flags: libc::c_int| {
        // SAFETY: userfaultfd(2) takes an int of flags and returns a new fd or -1.
        retry_eintr(|| unsafe { libc::syscall(libc::SYS_userfaultfd, flags) })
    };
    let fd = match open(flags) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            open(flags | UFFD_USER_MODE_ONLY as libc::c_int).map_err(|source| HostError::Sys {
                op: "userfaultfd",
                source,
            })?
        }
        Err(source) => {
            return Err(HostError::Sys {
                op: "userfaultfd",
                source,
            })
        }
    };
    let fd = libc::c_int::try_from(fd).map_err(|_| HostError::Sys {
        op: "userfaultfd",
        source: std::io::Error::other("the kernel returned an fd out of range"),
    })?;
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API`: the handshake, requesting `features`. Returns the kernel's answer (granted
/// features, supported ioctls). `EINVAL` means a requested feature is not offered; the fd is
/// then unusable (the handshake is once per fd).
pub(crate) fn uffd_api(fd: BorrowedFd<'_>, features: u64) -> Result<uffdio_api, HostError> {
    let mut api = uffdio_api {
        api: UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: `api` is a live uffdio_api, the type UFFDIO_API reads and writes.
    unsafe { ioctl(fd, UFFDIO_API, &mut api) }.map_err(|source| HostError::Sys {
        op: "UFFDIO_API",
        source,
    })?;
    Ok(api)
}

/// The userfaultfd features this kernel offers: a handshake with `features = 0` on a scratch fd.
pub(crate) fn uffd_available_features() -> Result<u64, HostError> {
    let fd = userfaultfd(true)?;
    Ok(uffd_api(std::os::fd::AsFd::as_fd(&fd), 0)?.features)
}

/// Map the errno of a range operation: `ENOMEM`/`ENOENT` (no mapping there) to
/// [`HostError::NotMapped`], `EBUSY` (another userfaultfd has it) to
/// [`HostError::AlreadyTracked`], anything else to [`HostError::Sys`].
fn range_error(op: &'static str, start: u64, len: u64, source: std::io::Error) -> HostError {
    match source.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::ENOENT) => HostError::NotMapped {
            op,
            addr: start,
            len,
        },
        Some(libc::EBUSY) => HostError::AlreadyTracked { addr: start, len },
        _ => HostError::Sys { op, source },
    }
}

/// `UFFDIO_REGISTER` of `[start, start + len)` with `mode`; returns the ioctls the range
/// supports (bit `_UFFDIO_*`).
pub(crate) fn uffd_register(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    mode: u64,
) -> Result<u64, HostError> {
    let mut reg = uffdio_register {
        range: uffdio_range { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: `reg` is a live uffdio_register, the type UFFDIO_REGISTER reads and writes.
    unsafe { ioctl(fd, UFFDIO_REGISTER, &mut reg) }.map_err(|e| {
        // EINVAL for a range with a hole in it as for memory that cannot be registered: tell
        // them apart.
        if e.raw_os_error() == Some(libc::EINVAL) && check_mapped(start, len).is_err() {
            return HostError::NotMapped {
                op: "UFFDIO_REGISTER",
                addr: start,
                len,
            };
        }
        range_error("UFFDIO_REGISTER", start, len, e)
    })?;
    Ok(reg.ioctls)
}

/// `UFFDIO_UNREGISTER` of `[start, start + len)` (also lifts write-protection there).
pub(crate) fn uffd_unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), HostError> {
    let mut range = uffdio_range { start, len };
    // SAFETY: `range` is a live uffdio_range, the type UFFDIO_UNREGISTER reads.
    unsafe { ioctl(fd, UFFDIO_UNREGISTER, &mut range) }
        .map_err(|e| range_error("UFFDIO_UNREGISTER", start, len, e))?;
    Ok(())
}

/// `UFFDIO_WRITEPROTECT` of `[start, start + len)`: protect (`protect`), or lift protection
/// and wake the threads blocked on the range.
pub(crate) fn uffd_writeprotect(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    protect: bool,
) -> Result<(), HostError> {
    let mut wp = uffdio_writeprotect {
        range: uffdio_range { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: `wp` is a live uffdio_writeprotect, the type UFFDIO_WRITEPROTECT reads.
    unsafe { ioctl(fd, UFFDIO_WRITEPROTECT, &mut wp) }
        .map_err(|e| range_error("UFFDIO_WRITEPROTECT", start, len, e))?;
    Ok(())
}

/// `PAGEMAP_SCAN` on a `/proc/self/pagemap` fd. Returns the number of `page_region`s written
/// to `arg.vec`; `arg.walk_end` says where the walk stopped.
///
/// # Safety
/// `arg.vec` must be 0 (with `arg.vec_len` 0) or point to `arg.vec_len` writable
/// `page_region`s that nothing else accesses during the call.
pub(crate) unsafe fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    arg: &mut pm_scan_arg,
) -> Result<usize, HostError> {
    // SAFETY: `arg` is a live pm_scan_arg; the caller guarantees its vec.
    let n = unsafe { ioctl(pagemap, PAGEMAP_SCAN, arg) }.map_err(|source| HostError::Sys {
        op: "PAGEMAP_SCAN",
        source,
    })?;
    usize::try_from(n).map_err(|_| HostError::Sys {
        op: "PAGEMAP_SCAN",
        source: std::io::Error::other("negative region count"),
    })
}

/// Is `[addr, addr + len)` wholly mapped? `msync(MS_ASYNC)` does nothing but walk the
/// mappings and fail with `ENOMEM` at a hole.
pub(crate) fn check_mapped(addr: u64, len: u64) -> Result<(), HostError> {
    let (Ok(a), Ok(l)) = (usize::try_from(addr), usize::try_from(len)) else {
        return Err(HostError::NotMapped {
            op: "msync",
            addr,
            len,
        });
    };
    // SAFETY: msync(MS_ASYNC) reads no memory and changes none; it only checks the range.
    let r = unsafe { libc::msync(a as *mut libc::c_void, l, libc::MS_ASYNC) };
    if r != 0 {
        return Err(range_error(
            "msync",
            addr,
            len,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Open `/proc/self/pagemap` for `PAGEMAP_SCAN`.
pub(crate) fn open_pagemap() -> Result<OwnedFd, HostError> {
    std::fs::File::open("/proc/self/pagemap")
        .map(OwnedFd::from)
        .map_err(|source| HostError::Sys {
            op: "open /proc/self/pagemap",
            source,
        })
}

/// The system's base page size.
pub(crate) fn base_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(r).ok().filter(|&p| p > 0).unwrap_or(4096)
}

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

    #[test]
    fn uffd_numbers_match_the_uapi_layout() {
        let iowr = |nr: u32, size: usize| (3 << 30) | ((size as u32) << 16) | (0xAA << 8) | nr;
        assert_eq!(UFFDIO_API, iowr(0x3F, std::mem::size_of::<uffdio_api>()));
        assert_eq!(
            UFFDIO_REGISTER,
            iowr(0x00, std::mem::size_of::<uffdio_register>())
        );
        assert_eq!(
            UFFDIO_WRITEPROTECT,
            iowr(0x06, std::mem::size_of::<uffdio_writeprotect>())
        );
        // UFFDIO_UNREGISTER is _IOR.
        assert_eq!(
            UFFDIO_UNREGISTER,
            (2 << 30) | ((std::mem::size_of::<uffdio_range>() as u32) << 16) | (0xAA << 8) | 1
        );
    }
}
