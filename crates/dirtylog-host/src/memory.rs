//! [`HostMemory`]: a mapping this crate owns, of one of the [`HostBacking`]s a tracker can
//! watch.

use std::fmt;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;

use serde::Serialize;

use crate::sys;
use crate::HostError;

/// 2 MiB, the huge page size of [`HostBacking::HugeTlb`].
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// What backs a [`HostMemory`].
///
/// ```
/// use dirtylog_host::HostBacking;
///
/// assert_eq!("memfd".parse::<HostBacking>().unwrap(), HostBacking::Memfd);
/// assert_eq!(HostBacking::Anonymous.to_string(), "anon");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum HostBacking {
    /// Private anonymous memory, 4 KiB pages (`MADV_NOHUGEPAGE`, so a write dirties 4 KiB).
    #[serde(rename = "anon")]
    Anonymous,
    /// Shared memory: a `memfd_create` file mapped `MAP_SHARED` (how VMMs share guest RAM
    /// with device processes), 4 KiB pages.
    #[serde(rename = "memfd")]
    Memfd,
    /// Private anonymous 2 MiB huge pages (`MAP_HUGETLB | MAP_HUGE_2MB`), from the pool
    /// reserved in `/proc/sys/vm/nr_hugepages`; one write dirties 2 MiB.
    #[serde(rename = "hugetlb")]
    HugeTlb,
}

impl HostBacking {
    /// The three backings.
    pub const ALL: [HostBacking; 3] = [
        HostBacking::Anonymous,
        HostBacking::Memfd,
        HostBacking::HugeTlb,
    ];

    /// The name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HostBacking::Anonymous => "anon",
            HostBacking::Memfd => "memfd",
            HostBacking::HugeTlb => "hugetlb",
        }
    }

    /// The page size of this backing: the base page size, or 2 MiB for hugetlb.
    pub fn page_size(self) -> u64 {
        match self {
            HostBacking::HugeTlb => HUGE_PAGE_SIZE,
            _ => sys::base_page_size(),
        }
    }
}

impl fmt::Display for HostBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a backing name did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backing {0:?}: use anon, memfd or hugetlb")]
pub struct ParseHostBackingError(String);

impl FromStr for HostBacking {
    type Err = ParseHostBackingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostBacking::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| ParseHostBackingError(s.to_string()))
    }
}

/// 2 MiB huge pages free for new mappings now (free minus reserved), from sysfs; 0 if unknown.
pub fn free_huge_pages() -> u64 {
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

/// A read-write mapping owned by this crate (unmapped on drop), zero-filled when created.
/// Share it between threads with `Arc`; write it through [`words`](Self::words) (safe) or
/// [`as_ptr`](Self::as_ptr) (raw).
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: u64,
    page_size: u64,
    backing: HostBacking,
}

// SAFETY: HostMemory is a pointer to a mapping it alone owns (unmapped only in Drop); the safe
// accessors give shared access only through atomics, so moving it or sharing it between
// threads cannot cause a data race.
unsafe impl Send for HostMemory {}
// SAFETY: as above: `&HostMemory` gives only atomic access to the bytes.
unsafe impl Sync for HostMemory {}

impl fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostMemory")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .field("page_size", &self.page_size)
            .field("backing", &self.backing)
            .finish()
    }
}

impl HostMemory {
    /// Map `len` bytes of `backing`: `len > 0` and a multiple of the backing's page size
    /// (2 MiB for hugetlb, whose pages must be reserved: see
    /// [`HostError::HugePagesUnavailable`]).
    pub fn new(len: u64, backing: HostBacking) -> Result<Self, HostError> {
        let page_size = backing.page_size();
        if len == 0 {
            return Err(HostError::ZeroLength);
        }
        if len % page_size != 0 {
            return Err(HostError::Unaligned {
                what: "length",
                value: len,
                page_size,
            });
        }
        let ulen = usize::try_from(len).map_err(|_| HostError::TooLarge(len))?;
        if ulen > isize::MAX as usize {
            return Err(HostError::TooLarge(len));
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let addr = match backing {
            HostBacking::Anonymous => {
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
                let p = mmap(ulen, prot, flags, -1)?;
                // SAFETY: `p` is our fresh mapping of `ulen` bytes; the advice changes only
                // how it is backed.
                if unsafe { libc::madvise(p, ulen, libc::MADV_NOHUGEPAGE) } != 0 {
                    let e = HostError::last_os("madvise(MADV_NOHUGEPAGE)");
                    // SAFETY: unmapping our own fresh mapping, never handed out.
                    unsafe { libc::munmap(p, ulen) };
                    return Err(e);
                }
                p
            }
            HostBacking::Memfd => {
                // SAFETY: the name is a NUL-terminated C string literal.
                let fd =
                    unsafe { libc::memfd_create(c"dirtylog-host".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(HostError::last_os("memfd_create"));
                }
                // SAFETY: `fd` was just returned and is owned by nothing else.
                let fd =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                let file = std::fs::File::from(fd);
                file.set_len(len).map_err(|source| HostError::Sys {
                    op: "ftruncate",
                    source,
                })?;
                // The mapping keeps the file alive; the fd is closed when `file` drops.
                mmap(
                    ulen,
                    prot,
                    libc::MAP_SHARED,
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                )?
            }
            HostBacking::HugeTlb => {
                let flags = libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_HUGETLB
                    | linux_raw_sys::general::MAP_HUGE_2MB as libc::c_int;
                mmap(ulen, prot, flags, -1).map_err(|e| match e.errno() {
                    Some(libc::ENOMEM) => HostError::HugePagesUnavailable {
                        needed: len / HUGE_PAGE_SIZE,
                        free: free_huge_pages(),
                    },
                    _ => e,
                })?
            }
        };
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(HostError::Sys {
            op: "mmap",
            source: std::io::Error::other("mapped at address 0"),
        })?;
        Ok(HostMemory {
            ptr,
            len,
            page_size,
            backing,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a mapping has at least one page (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The page size (the base page size, or 2 MiB for hugetlb).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages in the mapping.
    pub fn npages(&self) -> u64 {
        self.len / self.page_size
    }

    /// The backing.
    pub fn backing(&self) -> HostBacking {
        self.backing
    }

    /// The start of the mapping. Accesses through it are the caller's to make sound (use
    /// atomics, or [`words`](Self::words), while other threads may access the same bytes).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The mapping as 64-bit words, for shared access from any thread.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is readable and writable for `len` bytes (≤ isize::MAX, checked
        // in `new`) until `self` drops, page-aligned (so aligned for AtomicU64), every bit
        // pattern is a valid AtomicU64, and AtomicU64 has interior mutability, so shared
        // references to it may coexist with writes through other such references.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().cast::<AtomicU64>(),
                (self.len / 8) as usize,
            )
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping of `len` bytes (checked to fit usize in `new`), and no
        // reference into it outlives `self` (`words` borrows `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len as usize) };
    }
}

/// `mmap(NULL, len, prot, flags, fd, 0)`.
fn mmap(
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
) -> Result<*mut libc::c_void, HostError> {
    // SAFETY: a new mapping at an address the kernel chooses: no existing memory is affected.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(HostError::last_os("mmap"));
    }
    Ok(p)
}
