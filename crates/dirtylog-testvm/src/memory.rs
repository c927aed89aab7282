//! Anonymous guest memory: one `mmap` per region, accessed from the host only through
//! atomics and volatile copies, because vCPUs write it concurrently behind Rust's back.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Op, Result};

/// How to back a region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// `madvise(MADV_NOHUGEPAGE)`: keep 4 KiB host pages, so that KVM maps (and write-protects)
    /// at 4 KiB and no huge-page split happens when logging starts.
    pub no_huge_pages: bool,
    /// `MAP_POPULATE`: fault every page in at creation, so the first guest pass does not pay
    /// the host page faults.
    pub populate: bool,
}

/// One anonymous, private, read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct GuestMemory {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the host touches it only through
// atomics and volatile accesses, so sharing it between threads (and with vCPUs) is sound.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; no method hands out a plain `&`/`&mut` reference to the bytes.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Map `len` bytes (a multiple of the host page size, not 0) of zeroed memory.
    pub fn new(len: usize, opts: MemoryOptions) -> Result<Self> {
        let page = crate::sys::host_page_size() as usize;
        if len == 0 || len & (page - 1) != 0 {
            return Err(Error::Config(format!(
                "guest memory size {len} is not a non-zero multiple of the page size {page}"
            )));
        }
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if opts.populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; it aliases
        // nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last(Op::MmapGuestMemory));
        }
        let addr = NonNull::new(p.cast::<u8>()).ok_or(Error::Kvm {
            op: Op::MmapGuestMemory,
            errno: libc::ENOMEM,
        })?;
        let mem = GuestMemory { addr, len };
        if opts.no_huge_pages {
            // SAFETY: advising our own mapping, whole range.
            let r = unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
            if r != 0 {
                return Err(Error::last(Op::Madvise));
            }
        }
        Ok(mem)
    }

    /// Host address of the first byte (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a mapping is never empty); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 8-byte word at `offset` as an atomic. Panics if `offset` is misaligned or out of
    /// range (a bug in the caller's layout, never an I/O condition).
    pub fn atomic_u64(&self, offset: u64) -> &AtomicU64 {
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        assert!(
            off & 7 == 0 && off.checked_add(8).is_some_and(|e| e <= self.len),
            "guest memory offset {offset:#x} out of range or misaligned"
        );
        // SAFETY: in bounds and 8-aligned (the mapping is page aligned); the mapping lives as
        // long as `&self`; every access to guest memory is atomic or volatile, and the guest
        // only does aligned 8-byte stores to these words, so there is no mixed-size race.
        unsafe { AtomicU64::from_ptr(self.addr.as_ptr().add(off).cast::<u64>()) }
    }

    /// Load the 8-byte word at `offset`.
    pub fn read_u64(&self, offset: u64) -> u64 {
        self.atomic_u64(offset).load(Ordering::Acquire)
    }

    /// Store the 8-byte word at `offset`.
    pub fn write_u64(&self, offset: u64, v: u64) {
        self.atomic_u64(offset).store(v, Ordering::Release)
    }

    /// Copy `data` to `offset` (volatile, byte by byte; for loading code and tables at setup).
    pub fn write_bytes(&self, offset: u64, data: &[u8]) {
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        assert!(
            off.checked_add(data.len()).is_some_and(|e| e <= self.len),
            "guest memory write at {offset:#x}+{} out of range",
            data.len()
        );
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in bounds (checked above) of a live mapping; volatile because the guest
            // may run concurrently.
            unsafe { self.addr.as_ptr().add(off + i).write_volatile(*b) };
        }
    }

    /// Copy `out.len()` bytes from `offset` (volatile).
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) {
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        assert!(
            off.checked_add(out.len()).is_some_and(|e| e <= self.len),
            "guest memory read at {offset:#x}+{} out of range",
            out.len()
        );
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds of a live mapping; volatile because the guest may write
            // concurrently.
            *b = unsafe { self.addr.as_ptr().add(off + i).read_volatile() };
        }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created. Nothing can reach it any
        // more: host accessors borrow `self`, and VMs keep an `Arc` to every region a memslot
        // or a vCPU can still use.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_read_write() {
        let m = GuestMemory::new(
            3 * 4096,
            MemoryOptions {
                no_huge_pages: true,
                populate: true,
            },
        )
        .unwrap();
        assert_eq!(m.read_u64(4096), 0);
        m.write_u64(4096, 7);
        assert_eq!(m.read_u64(4096), 7);
        m.write_bytes(8192 + 3, &[1, 2, 3]);
        let mut b = [0u8; 4];
        m.read_bytes(8192 + 2, &mut b);
        assert_eq!(b, [0, 1, 2, 3]);
        assert!(GuestMemory::new(100, MemoryOptions::default()).is_err());
    }
}
