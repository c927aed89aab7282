//! A userfaultfd handle for other crates: the building blocks of copy-before-write snapshots
//! (synchronous write-protection: a write to a protected page waits until the handler lifts
//! the protection) and of lazy restore (`MISSING` faults served with `UFFDIO_COPY` or
//! `UFFDIO_ZEROPAGE`). The trackers of this crate use the same wrappers internally.
//!
//! Every call maps errno to a [`HostError`]. The fd is non-blocking: [`Userfaultfd::poll`]
//! waits for faults (and, optionally, for a [`Wakeup`] that asks the handler to stop),
//! [`Userfaultfd::read_faults`] reads what is queued.
//!
//! Faults from the kernel on behalf of the process (a `read(2)` into the range, KVM's accesses
//! to guest memory through the host page tables) are trapped too when the process may (root
//! or `CAP_SYS_PTRACE`); otherwise the fd is opened with `UFFD_USER_MODE_ONLY` and such
//! accesses fail with `EFAULT`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_copy, uffdio_range, uffdio_zeropage, UFFDIO_REGISTER_MODE_MISSING,
    UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE,
};
use linux_raw_sys::ioctl::{UFFDIO_COPY, UFFDIO_WAKE, UFFDIO_ZEROPAGE};

use crate::sys::{self, UFFDIO_REGISTER_MODE_WP};
use crate::HostError;

pub use linux_raw_sys::general::{
    UFFD_FEATURE_MISSING_HUGETLBFS, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
};

/// Bytes of a `struct uffd_msg`.
const MSG_SIZE: usize = std::mem::size_of::<uffd_msg>();
/// Messages read at once by [`Userfaultfd::read_faults`].
pub const MSG_BATCH: usize = 16;
/// Offsets in a `uffd_msg` of the event, `arg.pagefault.flags` and `.address` (the struct is
/// packed; the bytes are read with `from_ne_bytes` rather than through its unions).
const MSG_EVENT: usize = std::mem::offset_of!(uffd_msg, event);
const MSG_FLAGS: usize = std::mem::offset_of!(uffd_msg, arg);
const MSG_ADDRESS: usize = MSG_FLAGS + 8;

/// How a range is registered ([`Userfaultfd::register`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterMode {
    /// `UFFDIO_REGISTER_MODE_MISSING`: an access to a page that is not there faults.
    pub missing: bool,
    /// `UFFDIO_REGISTER_MODE_WP`: a write to a write-protected page faults.
    pub write_protect: bool,
}

impl RegisterMode {
    fn bits(self) -> u64 {
        let mut m = 0;
        if self.missing {
            m |= u64::from(UFFDIO_REGISTER_MODE_MISSING);
        }
        if self.write_protect {
            m |= u64::from(UFFDIO_REGISTER_MODE_WP);
        }
        m
    }
}

/// One message read from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `UFFD_EVENT_PAGEFAULT`: a thread waits at `addr` (the faulting address, not rounded).
    Page {
        /// The faulting address.
        addr: u64,
        /// A write (`UFFD_PAGEFAULT_FLAG_WRITE`).
        write: bool,
        /// A write to a write-protected page (`UFFD_PAGEFAULT_FLAG_WP`).
        write_protect: bool,
    },
    /// Another event (fork, remap, remove, unmap: only if such features were asked for).
    Other {
        /// The `UFFD_EVENT_*` number.
        event: u8,
    },
}

/// What a fill ([`Userfaultfd::copy`], [`Userfaultfd::zeropage`]) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// This many bytes from the start were filled (all of them, or fewer when the kernel
    /// stopped early, e.g. at a page that was already there); waiters on them were woken.
    Filled(u64),
    /// The first page was already there (`EEXIST`): nothing was filled, nobody woken.
    Exists,
}

/// What [`Userfaultfd::poll`] found ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// Messages are queued on the userfaultfd.
    pub faults: bool,
    /// The [`Wakeup`] was signalled.
    pub wakeup: bool,
}

/// An open, initialised userfaultfd (`O_CLOEXEC | O_NONBLOCK`). Closing it (drop) unregisters
/// every range and wakes every waiter.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

fn sys_err(op: &'static str, source: std::io::Error) -> HostError {
    HostError::Sys { op, source }
}

impl Userfaultfd {
    /// Open a userfaultfd and do the `UFFDIO_API` handshake, asking for the features of
    /// `wanted` this kernel offers (the others are left out, not an error: see
    /// [`features`](Self::features)).
    pub fn new(wanted: u64) -> Result<Self, HostError> {
        let available = sys::uffd_available_features()?;
        let fd = sys::userfaultfd(true)?;
        let granted = available & wanted;
        sys::uffd_api(fd.as_fd(), granted)?;
        Ok(Userfaultfd {
            fd,
            features: granted,
        })
    }

    /// The features granted (a subset of those asked for).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// `UFFDIO_REGISTER` of `[addr, addr + len)` (page-aligned, mapped in this process) with
    /// `mode`. Returns the ioctls the range supports (bit `_UFFDIO_*`). Registering memory makes
    /// accesses to it wait for this fd's handler: whoever registers must serve the faults.
    pub fn register(&self, addr: u64, len: u64, mode: RegisterMode) -> Result<u64, HostError> {
        sys::uffd_register(self.fd.as_fd(), addr, len, mode.bits())
    }

    /// `UFFDIO_UNREGISTER` of `[addr, addr + len)` (also lifts write-protection there and wakes
    /// the waiters).
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), HostError> {
        sys::uffd_unregister(self.fd.as_fd(), addr, len)
    }

    /// `UFFDIO_WRITEPROTECT` of `[addr, addr + len)`: protect (mode `WP`), or lift protection
    /// (mode 0), which wakes the writers waiting there.
    pub fn writeprotect(&self, addr: u64, len: u64, protect: bool) -> Result<(), HostError> {
        sys::uffd_writeprotect(self.fd.as_fd(), addr, len, protect)
    }

    /// `UFFDIO_WAKE` of `[addr, addr + len)`: wake the threads waiting there (they fault again
    /// if the page is still missing or protected).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), HostError> {
        let mut range = uffdio_range { start: addr, len };
        // SAFETY: `range` is a live uffdio_range, the type UFFDIO_WAKE reads.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as libc::Ioctl, &mut range) };
        if r < 0 {
            return Err(sys_err("UFFDIO_WAKE", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// `UFFDIO_COPY` of `src` (whole pages) to the missing pages at `dst` (page-aligned, in a
    /// range registered `MISSING` on this fd), waking the waiters there. A page already present
    /// stops the copy ([`Fill::Exists`] if it is the first, else a short [`Fill::Filled`]).
    ///
    /// # Safety
    /// `dst..dst + src.len()` must be memory of this process whose contents the caller
    /// governs: no Rust reference may rely on the missing pages there staying zero (a missing
    /// page of a registered range cannot be read by anyone until it is filled, so this holds
    /// for memory that only the caller's VM, or nobody yet, accesses).
    pub unsafe fn copy(&self, dst: u64, src: &[u8]) -> Result<Fill, HostError> {
        let mut c = uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: `c` is a live uffdio_copy, which UFFDIO_COPY reads and writes (`copy`); the
        // kernel reads `src` (a live slice of that length) and writes only missing pages of
        // `dst`, which the caller vouches for.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as libc::Ioctl, &mut c) };
        fill_result("UFFDIO_COPY", r, c.copy)
    }

    /// `UFFDIO_ZEROPAGE` of `[dst, dst + len)` (page-aligned, in a range registered `MISSING`
    /// on this fd): map the zero page at the missing pages (a later write allocates), waking
    /// the waiters there. A missing page reads as zeros anyway, so this changes no contents.
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<Fill, HostError> {
        let mut z = uffdio_zeropage {
            range: uffdio_range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `z` is a live uffdio_zeropage, which UFFDIO_ZEROPAGE reads and writes.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as libc::Ioctl, &mut z) };
        fill_result("UFFDIO_ZEROPAGE", r, z.zeropage)
    }

    /// Wait up to `timeout_ms` (−1: forever) for faults on this fd or for `wakeup`.
    pub fn poll(&self, wakeup: Option<&Wakeup>, timeout_ms: i32) -> Result<Ready, HostError> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wakeup.map_or(-1, |w| w.fd.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two live pollfds (poll ignores a negative fd).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if r >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(sys_err("poll(userfaultfd)", e));
            }
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(sys_err(
                "poll(userfaultfd)",
                std::io::Error::other("the userfaultfd reported an error"),
            ));
        }
        Ok(Ready {
            faults: fds[0].revents & libc::POLLIN != 0,
            wakeup: fds[1].revents & libc::POLLIN != 0,
        })
    }

    /// Read the queued messages (at most [`MSG_BATCH`]) into `out` (cleared first); none if
    /// nothing is queued.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> Result<(), HostError> {
        out.clear();
        let mut buf = [0u8; MSG_SIZE * MSG_BATCH];
        let n = loop {
            // SAFETY: `buf` is writable for its length; the kernel writes whole messages.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(()),
                Some(libc::EINTR) => continue,
                _ => return Err(sys_err("read(userfaultfd)", e)),
            }
        };
        for msg in buf[..n - n % MSG_SIZE].chunks_exact(MSG_SIZE) {
            let u64_at = |off: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&msg[off..off + 8]);
                u64::from_ne_bytes(b)
            };
            let event = msg[MSG_EVENT];
            out.push(if u32::from(event) == UFFD_EVENT_PAGEFAULT {
                let flags = u64_at(MSG_FLAGS);
                Fault::Page {
                    addr: u64_at(MSG_ADDRESS),
                    write: flags & u64::from(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                    write_protect: flags & u64::from(UFFD_PAGEFAULT_FLAG_WP) != 0,
                }
            } else {
                Fault::Other { event }
            });
        }
        Ok(())
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The result of a fill ioctl: `r` its return, `done` the bytes filled or a negated errno.
fn fill_result(op: &'static str, r: libc::c_int, done: i64) -> Result<Fill, HostError> {
    if r == 0 {
        return Ok(Fill::Filled(done.max(0) as u64));
    }
    if done > 0 {
        // Short: the kernel stopped at a page it could not fill (EAGAIN with a count).
        return Ok(Fill::Filled(done as u64));
    }
    let errno = if done < 0 {
        (-done) as i32
    } else {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    if errno == libc::EEXIST {
        return Ok(Fill::Exists);
    }
    Err(sys_err(op, std::io::Error::from_raw_os_error(errno)))
}

/// An eventfd that tells a fault handler blocked in [`Userfaultfd::poll`] to look up (to stop).
#[derive(Debug)]
pub struct Wakeup {
    fd: OwnedFd,
}

impl Wakeup {
    /// A new, unsignalled wakeup.
    pub fn new() -> Result<Self, HostError> {
        // SAFETY: eventfd has no memory preconditions; it returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(HostError::last_os("eventfd"));
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Wakeup { fd })
    }

    /// Signal it (it stays signalled).
    pub fn signal(&self) -> Result<(), HostError> {
        let one = 1u64;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if r != 8 {
            return Err(HostError::last_os("write(eventfd)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(len: usize) -> u64 {
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    #[test]
    fn missing_faults_are_served_with_copy_and_zeropage() {
        let page = sys::base_page_size();
        let len = 8 * page;
        let base = map(len as usize);
        let uffd = Userfaultfd::new(0).unwrap();
        let ioctls = uffd
            .register(
                base,
                len,
                RegisterMode {
                    missing: true,
                    write_protect: false,
                },
            )
            .unwrap();
        assert_ne!(ioctls & (1 << linux_raw_sys::general::_UFFDIO_COPY), 0);
        let data = vec![0xA5u8; page as usize];
        // SAFETY: our own fresh mapping, read by nobody yet.
        let first = unsafe { uffd.copy(base, &data) }.unwrap();
        assert_eq!(first, Fill::Filled(page));
        // SAFETY: as above.
        let again = unsafe { uffd.copy(base, &data) }.unwrap();
        assert_eq!(again, Fill::Exists);
        assert_eq!(
            uffd.zeropage(base + page, page).unwrap(),
            Fill::Filled(page)
        );
        // A reader of page 2 waits until the handler fills it.
        let reader = std::thread::spawn(move || {
            // SAFETY: reading a byte of our mapping (it is not unmapped before the join).
            unsafe { std::ptr::read_volatile((base + 2 * page + 5) as *const u8) }
        });
        let ready = uffd.poll(None, 10_000).unwrap();
        assert!(ready.faults);
        let mut faults = Vec::new();
        uffd.read_faults(&mut faults).unwrap();
        assert_eq!(faults.len(), 1);
        let Fault::Page { addr, write, .. } = faults[0] else {
            panic!("not a page fault: {:?}", faults[0]);
        };
        assert_eq!(addr & !(page - 1), base + 2 * page);
        assert!(!write);
        let data7 = vec![7u8; page as usize];
        // SAFETY: as above.
        unsafe { uffd.copy(base + 2 * page, &data7) }.unwrap();
        assert_eq!(reader.join().unwrap(), 7);
        // SAFETY: pages 0 and 1 are filled.
        let (b0, b1) = unsafe {
            (
                std::ptr::read_volatile(base as *const u8),
                std::ptr::read_volatile((base + page) as *const u8),
            )
        };
        assert_eq!((b0, b1), (0xA5, 0));
        uffd.unregister(base, len).unwrap();
        // SAFETY: unmapping our own mapping; nothing refers to it any more.
        unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
    }

    #[test]
    fn a_protected_write_waits_for_the_handler() {
        let page = sys::base_page_size();
        let len = 4 * page;
        let base = map(len as usize);
        // SAFETY: writing our own mapping before anyone else uses it.
        unsafe { std::ptr::write_volatile(base as *mut u8, 1) };
        let uffd = Userfaultfd::new(u64::from(UFFD_FEATURE_WP_UNPOPULATED)).unwrap();
        uffd.register(
            base,
            len,
            RegisterMode {
                missing: false,
                write_protect: true,
            },
        )
        .unwrap();
        uffd.writeprotect(base, len, true).unwrap();
        let wakeup = Wakeup::new().unwrap();
        let writer = std::thread::spawn(move || {
            // SAFETY: writing our mapping; the write waits for the handler.
            unsafe { std::ptr::write_volatile(base as *mut u8, 2) };
        });
        let ready = uffd.poll(Some(&wakeup), 10_000).unwrap();
        assert!(ready.faults && !ready.wakeup);
        let mut faults = Vec::new();
        uffd.read_faults(&mut faults).unwrap();
        assert!(matches!(
            faults[0],
            Fault::Page {
                write: true,
                write_protect: true,
                ..
            }
        ));
        // Still the old value while the writer waits.
        // SAFETY: reading our mapping.
        assert_eq!(unsafe { std::ptr::read_volatile(base as *const u8) }, 1);
        uffd.writeprotect(base, page, false).unwrap();
        writer.join().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile(base as *const u8) }, 2);
        wakeup.signal().unwrap();
        assert!(uffd.poll(Some(&wakeup), 0).unwrap().wakeup);
        uffd.unregister(base, len).unwrap();
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
    }
}
