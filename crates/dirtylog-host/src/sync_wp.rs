//! The first fallback: [`SyncWatch`], userfaultfd write-protection *without*
//! `UFFD_FEATURE_WP_ASYNC` (Linux ≥ 5.7 for anonymous memory, 5.19 for shmem and hugetlbfs).
//!
//! The region is registered with `UFFDIO_REGISTER_MODE_WP` and write-protected with
//! `UFFDIO_WRITEPROTECT`. A write to a protected page blocks the writing thread and queues a
//! `uffd_msg` on the userfaultfd; a fault-handling thread of ours reads it, sets the page's
//! bit in a [`DirtyBitmap`] and lifts the page's protection with `UFFDIO_WRITEPROTECT`
//! (mode 0), which wakes the writer. The thread polls the userfaultfd and an eventfd that
//! [`disarm`](WriteWatch::disarm) (and drop) signal to stop it.
//!
//! `UFFD_FEATURE_WP_UNPOPULATED` (Linux ≥ 6.4) is asked for when the kernel offers it, so a
//! page never touched before arming faults on its first write too. Without it, `arm` first
//! populates the region (`MADV_POPULATE_WRITE`): the kernel cannot protect a page that is not
//! there. `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` is asked for when offered, for memfd and hugetlb
//! regions.
//!
//! **The race rule** ([`WriteWatch`]): the handler's "set the bit, lift the protection" and the
//! harvest's "take the bits, re-protect their pages" (`fault_log.rs`) run under one mutex, so
//! a page is writable only while its bit is set.
//!
//! **Cost.** Each first write to a protected page is a fault, a context switch to the handler
//! thread, a `read` of the message, one `UFFDIO_WRITEPROTECT` and a wake-up of the writer —
//! a round trip between two threads: measured 6.4–11 µs per page here (4096 populated pages
//! written in order, release build, medians of 9 rounds, nested virtualisation and a busy
//! 2-core machine; untracked 18–22 ns), about as dear as `mprotect` and several times async
//! uffd-wp (≈ 1.5 µs, the kernel resolves the fault itself). Reproduce with
//! `cargo bench -p dirtylog-host --bench host -- first-write` (BENCHMARKS.md). Faults of many writers are batched (up to 16 messages a read, one
//! lock). Each harvest costs one `UFFDIO_WRITEPROTECT` per run of written pages. Unlike
//! `mprotect`, no mapping is split, and the kernel's own writes (`read(2)` into the region)
//! are trapped and recorded too, when the process may trap kernel faults (root or
//! `CAP_SYS_PTRACE`; otherwise `UFFD_USER_MODE_ONLY` is used and such a write fails with
//! `EFAULT`). Memory: one bit per page, and a thread per armed region.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use dirtylog::DirtyBitmap;
use linux_raw_sys::general::{uffd_msg, UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP};

use crate::fault_log;
use crate::sys::{
    self, _UFFDIO_WRITEPROTECT, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
};
use crate::watch::WriteWatch;
use crate::{HostError, HostMethod};

/// Bytes of a `struct uffd_msg`.
const MSG_SIZE: usize = std::mem::size_of::<uffd_msg>();
/// Messages read at once.
const MSG_BATCH: usize = 16;
/// Offsets in a `uffd_msg` of the event, and of `arg.pagefault.flags` and `.address` (the
/// struct is packed; the bytes are read with `from_ne_bytes` instead of through its unions).
const MSG_EVENT: usize = std::mem::offset_of!(uffd_msg, event);
const MSG_FLAGS: usize = std::mem::offset_of!(uffd_msg, arg);
const MSG_ADDRESS: usize = MSG_FLAGS + 8;

/// A region watched with synchronous userfaultfd write-protection. See the module docs.
pub(crate) struct SyncWatch {
    inner: Arc<Inner>,
    /// The fault-handling thread while armed. Its own mutex: taken by `arm`/`disarm` only,
    /// never while `Inner::state` is held by this side.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the watch and its fault-handling thread share.
struct Inner {
    uffd: OwnedFd,
    /// Written to stop the thread.
    stop: OwnedFd,
    addr: u64,
    len: u64,
    shift: u32,
    /// `UFFD_FEATURE_WP_UNPOPULATED` was granted.
    unpopulated: bool,
    bitmap: DirtyBitmap,
    /// The lock of the race rule: the handler holds it to record and lift, the harvest to
    /// take and re-protect.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    registered: bool,
    armed: bool,
    /// The handler's first failure, reported by the next harvest.
    failure: Option<HostError>,
    /// The handler stopped for good (it made the whole region writable and dirty first).
    dead: bool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock's state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// Protect (or lift the protection of, waking the writers blocked there) pages
    /// `first..first + n`, inside the region.
    fn wp_pages(&self, first: u64, n: u64, protect: bool) -> Result<(), HostError> {
        sys::uffd_writeprotect(
            self.fd(),
            self.addr + (first << self.shift),
            n << self.shift,
            protect,
        )
    }

    /// The fault-handling thread: until `stop` is signalled, read fault messages and, for each
    /// write to a protected page, record the page and lift its protection.
    fn serve(&self) {
        let mut buf = [0u8; MSG_SIZE * MSG_BATCH];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two live pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return self.die(HostError::Sys {
                    op: "poll(userfaultfd)",
                    source: e,
                });
            }
            if fds[1].revents != 0 {
                let mut v = 0u64;
                // SAFETY: reading the 8-byte eventfd counter into a u64 (resets it).
                unsafe { libc::read(self.stop.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return self.die(HostError::Sys {
                    op: "poll(userfaultfd)",
                    source: std::io::Error::other("the userfaultfd reported an error"),
                });
            }
            // SAFETY: `buf` is writable for its length; the kernel writes whole messages.
            let n =
                unsafe { libc::read(self.uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // Another wake-up took the message, or a signal: poll again.
                    Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                    _ => {
                        return self.die(HostError::Sys {
                            op: "read(userfaultfd)",
                            source: e,
                        })
                    }
                }
            }
            let got = n as usize / MSG_SIZE;
            let mut st = self.lock();
            for msg in buf[..got * MSG_SIZE].chunks_exact(MSG_SIZE) {
                self.fault(&mut st, msg);
            }
        }
    }

    /// Handle one message, with the lock held.
    fn fault(&self, st: &mut State, msg: &[u8]) {
        let u64_at = |off: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[off..off + 8]);
            u64::from_ne_bytes(b)
        };
        if u32::from(msg[MSG_EVENT]) != UFFD_EVENT_PAGEFAULT
            || u64_at(MSG_FLAGS) & u64::from(UFFD_PAGEFAULT_FLAG_WP) == 0
        {
            return;
        }
        let addr = u64_at(MSG_ADDRESS);
        if !st.armed || addr < self.addr || addr - self.addr >= self.len {
            // Disarmed meanwhile: the disarm lifted every protection and woke the writer.
            return;
        }
        let page = (addr - self.addr) >> self.shift;
        self.bitmap.set(page);
        if let Err(e) = self.wp_pages(page, 1, false) {
            st.failure.get_or_insert(e);
        }
    }

    /// The handler cannot go on: make every page writable and dirty so no writer stays
    /// blocked and nothing is lost, and leave the error for the next harvest.
    fn die(&self, e: HostError) {
        let mut st = self.lock();
        st.failure.get_or_insert(e);
        st.dead = true;
        self.bitmap.set_all();
        if st.registered {
            if let Err(e) = self.wp_pages(0, self.len >> self.shift, false) {
                st.failure.get_or_insert(e);
            }
            if let Err(e) = sys::uffd_unregister(self.fd(), self.addr, self.len) {
                st.failure.get_or_insert(e);
            }
            st.registered = false;
        }
    }
}

impl SyncWatch {
    /// Watch `[addr, addr + len)`, pages of `page_size` bytes (a mapping of this process that
    /// stays mapped while watched). Opens and sets up the userfaultfd; nothing is registered
    /// or protected until [`arm`](WriteWatch::arm).
    pub(crate) fn new(addr: usize, len: u64, page_size: u64) -> Result<Self, HostError> {
        Self::with_features(
            addr,
            len,
            page_size,
            u64::from(UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM),
        )
    }

    /// [`new`](Self::new), asking for `wanted` features where offered (tests leave
    /// `WP_UNPOPULATED` out to exercise the populating path).
    fn with_features(
        addr: usize,
        len: u64,
        page_size: u64,
        wanted: u64,
    ) -> Result<Self, HostError> {
        let (addr, ulen, shift) = fault_log::region_bounds(addr, len, page_size)?;
        let features = sys::uffd_available_features()? & wanted;
        let uffd = sys::userfaultfd(true)?;
        sys::uffd_api(uffd.as_fd(), features)?;
        // SAFETY: eventfd has no memory preconditions; it returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(HostError::last_os("eventfd"));
        }
        // SAFETY: a new fd that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        Ok(SyncWatch {
            inner: Arc::new(Inner {
                uffd,
                stop,
                addr: addr as u64,
                len: ulen as u64,
                shift,
                // Granted: what was asked for (the answer's `features` lists everything offered).
                unpopulated: features & u64::from(UFFD_FEATURE_WP_UNPOPULATED) != 0,
                bitmap: DirtyBitmap::new(len >> shift),
                state: Mutex::new(State::default()),
            }),
            thread: Mutex::new(None),
        })
    }

    fn threads(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.thread.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Signal the thread to stop and wait for it.
    fn stop_thread(&self, thread: &mut Option<JoinHandle<()>>) -> Result<(), HostError> {
        let Some(h) = thread.take() else {
            return Ok(());
        };
        let one = 1u64;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        let r = unsafe { libc::write(self.inner.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if r != 8 {
            // It cannot be told to stop: leave it (it holds its own reference) rather than
            // wait forever. The next arm starts another.
            return Err(HostError::last_os("write(eventfd)"));
        }
        let _ = h.join();
        Ok(())
    }
}

impl WriteWatch for SyncWatch {
    fn page_size(&self) -> u64 {
        1 << self.inner.shift
    }

    fn npages(&self) -> u64 {
        self.inner.bitmap.npages()
    }

    fn arm(&self) -> Result<(), HostError> {
        let inner = &self.inner;
        let mut thread = self.threads();
        {
            let mut st = inner.lock();
            if st.dead {
                // A handler that died unregistered the region; start over cleanly.
                st.dead = false;
                st.failure = None;
            }
            if !st.registered {
                let ioctls = sys::uffd_register(
                    inner.fd(),
                    inner.addr,
                    inner.len,
                    UFFDIO_REGISTER_MODE_WP.into(),
                )?;
                st.registered = true;
                if ioctls & (1 << _UFFDIO_WRITEPROTECT) == 0 {
                    let _ = sys::uffd_unregister(inner.fd(), inner.addr, inner.len);
                    st.registered = false;
                    return Err(HostError::Unsupported {
                        method: HostMethod::Sync,
                        why: "UFFDIO_WRITEPROTECT is not supported on this mapping".into(),
                    });
                }
            }
        }
        if thread.as_ref().is_some_and(|h| h.is_finished()) {
            let _ = thread.take().map(|h| h.join());
        }
        if thread.is_none() {
            // A stop signalled to a thread that had died already is still pending: clear it,
            // or the new thread would stop at once.
            let mut v = 0u64;
            // SAFETY: reading the 8-byte eventfd counter into a u64; EAGAIN when clear.
            unsafe { libc::read(inner.stop.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            let me = Arc::clone(inner);
            let h = std::thread::Builder::new()
                .name("dirtylog-uffd-wp".into())
                .spawn(move || me.serve())
                .map_err(|source| HostError::Sys {
                    op: "spawn the fault-handling thread",
                    source,
                })?;
            *thread = Some(h);
        }
        let mut st = inner.lock();
        inner.bitmap.clear_all();
        if !inner.unpopulated {
            // SAFETY: MADV_POPULATE_WRITE faults the pages in as a write would, changing no
            // content; the range is the caller's mapping.
            let r = unsafe {
                libc::madvise(
                    inner.addr as *mut libc::c_void,
                    inner.len as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                return Err(HostError::last_os("madvise(MADV_POPULATE_WRITE)"));
            }
        }
        st.armed = true;
        if let Err(e) = inner.wp_pages(0, self.npages(), true) {
            st.armed = false;
            let _ = inner.wp_pages(0, self.npages(), false);
            return Err(e);
        }
        Ok(())
    }

    fn harvest(&self, out: &mut [u64], reprotect: bool) -> Result<u64, HostError> {
        let inner = &self.inner;
        let mut st = inner.lock();
        if !st.armed {
            return Err(HostError::NotStarted);
        }
        if st.dead {
            // Every page was made writable and dirty: report them all, re-protect nothing.
            let n = fault_log::harvest(&inner.bitmap, out, false, |_, _| Ok(()))?;
            return match st.failure.take() {
                Some(e) => Err(e),
                None => Ok(n),
            };
        }
        let n = fault_log::harvest(&inner.bitmap, out, reprotect, |first, n| {
            inner.wp_pages(first, n, true)
        })?;
        match st.failure.take() {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    fn protect(&self, first_page: u64, bits: &[u64]) -> Result<(), HostError> {
        let inner = &self.inner;
        let st = inner.lock();
        if !st.armed || st.dead {
            return Err(HostError::NotStarted);
        }
        fault_log::protect(&inner.bitmap, first_page, bits, |first, n| {
            inner.wp_pages(first, n, true)
        })
    }

    fn disarm(&self) -> Result<(), HostError> {
        let inner = &self.inner;
        let mut thread = self.threads();
        let mut first_err = None;
        {
            let mut st = inner.lock();
            st.armed = false;
            if st.registered {
                // Lift every protection (waking blocked writers), then unregister.
                if let Err(e) = inner.wp_pages(0, self.npages(), false) {
                    first_err.get_or_insert(e);
                }
                if let Err(e) = sys::uffd_unregister(inner.fd(), inner.addr, inner.len) {
                    first_err.get_or_insert(e);
                }
                st.registered = false;
            }
        }
        if let Err(e) = self.stop_thread(&mut thread) {
            first_err.get_or_insert(e);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for SyncWatch {
    fn drop(&mut self) {
        let _ = self.disarm();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::fault_log::testing::{self, Mapping, PAGE};

    /// n·64 + 3 pages, as the protocol tests use.
    const NPAGES: u64 = 64 * 3 + 3;

    fn watch(m: &Mapping) -> SyncWatch {
        SyncWatch::new(m.addr(), m.len(), PAGE).expect("SyncWatch::new")
    }

    #[test]
    fn uffd_msg_layout_matches_the_uapi() {
        assert_eq!(MSG_SIZE, 32);
        assert_eq!((MSG_EVENT, MSG_FLAGS, MSG_ADDRESS), (0, 8, 16));
    }

    #[test]
    fn this_kernel_offers_wp_unpopulated() {
        // Linux 6.18 here: without it `arm` would populate the whole region first.
        let m = Mapping::anon(1);
        assert!(watch(&m).inner.unpopulated);
    }

    crate::fault_log::testing::shared_watch_tests!(watch, NPAGES);

    #[test]
    fn without_wp_unpopulated_arm_populates_first() {
        let m = Mapping::anon(NPAGES);
        let w = SyncWatch::with_features(m.addr(), m.len(), PAGE, 0).expect("new");
        assert!(!w.inner.unpopulated);
        testing::reports_exactly_the_written_pages(&w, &m);
        testing::racing_writes_are_never_lost(&w, &m, 2, true, 32);
    }

    #[test]
    fn a_second_watch_of_the_same_range_is_refused() {
        let m = Mapping::anon(8);
        let first = watch(&m);
        first.arm().expect("arm");
        let second = SyncWatch::new(m.addr() + 4 * PAGE as usize, 4 * PAGE, PAGE).expect("new");
        let e = second.arm().err();
        assert!(matches!(e, Some(HostError::AlreadyTracked { .. })), "{e:?}");
        drop(first);
        second.arm().expect("arm once the first is gone");
    }

    #[test]
    fn bad_ranges_are_refused() {
        let m = Mapping::anon(2);
        let e = SyncWatch::new(m.addr() + 8, PAGE, PAGE).err();
        assert!(
            matches!(
                e,
                Some(HostError::Unaligned {
                    what: "address",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = SyncWatch::new(m.addr(), 0, PAGE).err();
        assert!(matches!(e, Some(HostError::ZeroLength)), "{e:?}");
        // Not mapped at all: refused at arm, by the kernel.
        let hole = m.addr() + 2 * PAGE as usize;
        // SAFETY: unmapping our own second page, which nothing references.
        unsafe {
            libc::munmap(
                (m.addr() + PAGE as usize) as *mut libc::c_void,
                PAGE as usize,
            )
        };
        let w = SyncWatch::new(hole - PAGE as usize, PAGE, PAGE).expect("new");
        let e = w.arm().err();
        assert!(matches!(e, Some(HostError::NotMapped { .. })), "{e:?}");
    }

    /// Unlike mprotect, the kernel's own write into a protected page is trapped and recorded.
    #[test]
    fn a_system_call_writing_a_protected_page_is_recorded() {
        let m = Mapping::anon(4);
        let w = watch(&m);
        w.arm().expect("arm");
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let data = 42u64.to_ne_bytes();
        // SAFETY: 8 readable bytes into our own pipe.
        assert_eq!(unsafe { libc::write(fds[1], data.as_ptr().cast(), 8) }, 8);
        // SAFETY: 8 bytes into page 2 of our mapping, which only atomics otherwise touch.
        let r = unsafe {
            libc::read(
                fds[0],
                (m.addr() + 2 * PAGE as usize) as *mut libc::c_void,
                8,
            )
        };
        // SAFETY: our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(r, 8, "{}", std::io::Error::last_os_error());
        assert_eq!(m.word(2).load(Ordering::Relaxed), 42);
        let mut bits = [0u64; 1];
        assert_eq!(w.harvest(&mut bits, true).expect("harvest"), 1);
        assert_eq!(bits, [1 << 2]);
    }
}
