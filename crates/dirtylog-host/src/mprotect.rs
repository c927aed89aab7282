//! The last-resort method: [`MprotectWatch`] makes the region `PROT_READ` and learns of the
//! first write to each page from `SIGSEGV`. It needs nothing but `mprotect(2)` and
//! `sigaction(2)`, so it works where userfaultfd is missing or forbidden.
//!
//! A process-wide `SIGSEGV` handler (installed once, `SA_SIGINFO | SA_ONSTACK | SA_RESTART`,
//! every signal blocked while it runs) looks the fault address up in a fixed registry of
//! [`MAX_WATCHES`] watched ranges — static atomics, no allocation, no lock but the range's own
//! spin flag — sets the page's bit, makes the page `PROT_READ | PROT_WRITE` and returns, so
//! the write is retried and succeeds. `errno` is saved and restored around it.
//!
//! **Other faults are not swallowed.** The handler acts only on `SEGV_ACCERR` inside an armed
//! range. Anything else goes to the handler that was installed before (Rust's runtime installs
//! one that reports stack overflows), or, if that was the default action, restores the
//! default and returns so the fault repeats and kills the process as it would have. One
//! exception, for a fault that raced a disarm (the page was protected when the thread
//! faulted and is writable now): the first `SEGV_ACCERR` at an address outside every armed
//! range is retried once before it is passed on.
//!
//! **The race rule** ([`WriteWatch`]): the handler's "set the bit, make the page writable" and
//! the harvest's "take the bits, make their pages read-only" run under the range's spin flag
//! (see `fault_log.rs`). The harvest side never faults while it holds the flag (it touches
//! only the bitmap and `out`); if it did (an `out` inside the watched region), the handler
//! sees that its own thread holds the flag and goes ahead without it instead of deadlocking.
//!
//! **Cost.** Each first write to a protected page is a fault, a signal delivery, one
//! `mprotect` and a return from the signal: measured 8.9–11.4 µs per page here (4096
//! populated pages written in order, release build, medians of 9 rounds, nested
//! virtualisation and a busy 2-core machine; an untracked write of the same pages took
//! 20–30 ns), against ≈ 1.5 µs for async uffd-wp. Reproduce with
//! `cargo bench -p dirtylog-host --bench host -- first-write` (BENCHMARKS.md). Each harvest costs one `mprotect` per run of written pages. Every
//! writable page between read-only neighbours is a mapping of its own (a VMA): scattered
//! writes to a large region approach `vm.max_map_count` (65 530 by default). When the
//! handler's `mprotect` fails for that reason it makes the whole range writable and reports
//! every page — correct, but coarse until the next harvest protects the region again in one
//! call; when a harvest's fails, the harvest returns the error and the pages it could not
//! protect stay recorded. Memory: one bit per page.
//!
//! **Limits.** The region must be a private or shared read-write mapping (its protection is
//! restored to read-write, not to what it was). A system call that writes into a protected
//! page (`read(2)` into it) fails with `EFAULT` instead of faulting — only userfaultfd sees
//! the kernel's own writes. A handler installed for `SIGSEGV` after ours, that does not chain
//! to ours, disables the method.

use std::cell::{Cell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use dirtylog::DirtyBitmap;

use crate::fault_log;
use crate::watch::WriteWatch;
use crate::HostError;

/// Ranges the process-wide handler can watch at once.
pub(crate) const MAX_WATCHES: usize = 64;

/// Slot states.
const FREE: u32 = 0;
/// Owned by a watch, not armed: the handler ignores it.
const CLAIMED: u32 = 1;
/// Armed: the handler records faults in it.
const ARMED: u32 = 2;

/// One watched range of the registry. Everything is an atomic so the handler can read it at
/// any moment; the fields other than `state` and `owner` change only while the slot is
/// [`FREE`]/[`CLAIMED`] and its flag is held.
struct Slot {
    state: AtomicU32,
    /// The spin flag: the id of the thread holding it, or 0.
    owner: AtomicU32,
    start: AtomicUsize,
    end: AtomicUsize,
    shift: AtomicU32,
    bitmap: AtomicPtr<DirtyBitmap>,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            state: AtomicU32::new(FREE),
            owner: AtomicU32::new(0),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            shift: AtomicU32::new(0),
            bitmap: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// Take the flag for thread `tid` (async-signal-safe). `false` if `tid` holds it already:
    /// the caller then goes ahead without it and must not release it.
    fn lock(&self, tid: u32) -> bool {
        let mut spins = 0u32;
        loop {
            match self
                .owner
                .compare_exchange_weak(0, tid, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) if cur == tid => return false,
                Err(_) => {}
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                // SAFETY: sched_yield has no preconditions and is async-signal-safe.
                unsafe { libc::sched_yield() };
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn unlock(&self) {
        self.owner.store(0, Ordering::Release);
    }
}

static SLOTS: [Slot; MAX_WATCHES] = [const { Slot::new() }; MAX_WATCHES];

/// Serialises claiming and freeing slots (the overlap check). Never taken by the handler.
static CLAIM: Mutex<()> = Mutex::new(());

/// The `SIGSEGV` action found when ours was installed, written once before it.
struct Previous(UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: written once, before `PREVIOUS_SET` is released and before our handler (the only
// reader) is installed; read-only afterwards.
unsafe impl Sync for Previous {}
static PREVIOUS: Previous = Previous(UnsafeCell::new(MaybeUninit::uninit()));
static PREVIOUS_SET: AtomicBool = AtomicBool::new(false);

/// Disarms (and drops) so far: a fault outside every range is retried once per address and
/// disarm, in case it raced a disarm that has made its page writable since.
static DISARMS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The address outside every range that this thread's handler last let retry, and
    /// [`DISARMS`] then.
    static RETRIED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// The calling thread's id (async-signal-safe).
fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Install the handler, once per process.
fn install() -> Result<(), HostError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: PREVIOUS is written here only, once (OnceLock), before our handler that
        // reads it exists; the sigaction structs are live and fully initialised.
        unsafe {
            let prev = (*PREVIOUS.0.get()).as_mut_ptr();
            if libc::sigaction(libc::SIGSEGV, std::ptr::null(), prev) != 0 {
                return Err(errno());
            }
            PREVIOUS_SET.store(true, Ordering::Release);
            let mut sa: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigsegv;
            sa.sa_sigaction = handler as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
            libc::sigfillset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut()) != 0 {
                return Err(errno());
            }
        }
        Ok(())
    });
    r.map_err(|e| HostError::Sys {
        op: "sigaction(SIGSEGV)",
        source: std::io::Error::from_raw_os_error(e),
    })
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The `SIGSEGV` handler. Async-signal-safe: atomics, `mprotect`, `sigaction`, no allocation,
/// no panic.
extern "C" fn on_sigsegv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno, always valid.
    let saved = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo (or null, which `handle` checks).
    let handled = unsafe { handle(info) };
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
    if !handled {
        // SAFETY: forwarding the kernel's own arguments.
        unsafe { chain(sig, info, ctx) };
    }
}

/// Record a write fault in an armed range; `false` if the fault is not ours.
///
/// # Safety
/// `info` is null or the kernel's siginfo for this `SIGSEGV`.
unsafe fn handle(info: *const libc::siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: non-null, from the kernel.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code != SEGV_ACCERR {
        return false;
    }
    let tid = gettid();
    for slot in SLOTS.iter() {
        if slot.state.load(Ordering::Acquire) != ARMED {
            continue;
        }
        let (start, end) = (
            slot.start.load(Ordering::Acquire),
            slot.end.load(Ordering::Acquire),
        );
        if addr < start || addr >= end {
            continue;
        }
        let took = slot.lock(tid);
        // Under the flag, the slot cannot be disarmed or freed: check it is still this range.
        let ours = slot.state.load(Ordering::Acquire) == ARMED
            && slot.start.load(Ordering::Relaxed) == start
            && slot.end.load(Ordering::Relaxed) == end;
        // A slot disarmed meanwhile made the page writable: returning retries the write.
        // SAFETY: the slot is armed and its flag held (or held by this very thread), so its
        // bitmap is alive.
        let ok = !ours || unsafe { record(slot, addr, start, end) };
        if took {
            slot.unlock();
        }
        if ok {
            let _ = RETRIED.try_with(|r| r.set((0, 0)));
        }
        return ok;
    }
    // Outside every armed range: retry once (a fault that raced a disarm), then pass it on.
    let retry = (addr, DISARMS.load(Ordering::Acquire));
    RETRIED
        .try_with(|r| {
            if r.get() == retry {
                r.set((0, 0));
                false
            } else {
                r.set(retry);
                true
            }
        })
        .unwrap_or(false)
}

/// Set the page's bit, then make the page writable. `false` if no protection could be lifted.
///
/// # Safety
/// `slot` is armed with `[start, end)` and its flag held; its bitmap is alive.
unsafe fn record(slot: &Slot, addr: usize, start: usize, end: usize) -> bool {
    let shift = slot.shift.load(Ordering::Relaxed);
    // SAFETY: the caller guarantees the bitmap is alive while the slot is armed and held.
    let bitmap = unsafe { &*slot.bitmap.load(Ordering::Acquire) };
    let page = (addr - start) >> shift;
    bitmap.set(page as u64);
    let page_addr = start + (page << shift);
    // SAFETY: the page is in the armed range, a read-write mapping its watch protected.
    if unsafe { mprotect_raw(page_addr, 1 << shift, RW) } {
        return true;
    }
    // Most likely vm.max_map_count: every lone writable page is a mapping of its own. Make
    // the whole range writable, one mapping again, and report every page.
    bitmap.set_all();
    // SAFETY: as above, for the whole range.
    unsafe { mprotect_raw(start, end - start, RW) }
}

/// Pass a fault that is not ours to the previous handler, or to the default action.
///
/// # Safety
/// The kernel's arguments for this `SIGSEGV`.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if PREVIOUS_SET.load(Ordering::Acquire) {
        // SAFETY: written once before PREVIOUS_SET was released; read-only since.
        let prev = unsafe { &*(*PREVIOUS.0.get()).as_ptr() };
        let h = prev.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO the handler has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO the handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // The default action (an ignored SIGSEGV from a fault kills too): restore it and return,
    // so the fault repeats and the process dies of it as it would have without us.
    // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
    }
}

/// `si_code` of a fault on a mapped page the access is not permitted to
/// (`include/uapi/asm-generic/siginfo.h`; the libc crate lacks it).
const SEGV_ACCERR: libc::c_int = 2;

const RO: libc::c_int = libc::PROT_READ;
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// `mprotect(addr, len, prot)`; `true` on success (async-signal-safe).
///
/// # Safety
/// `[addr, addr + len)` is (part of) a watched read-write mapping.
unsafe fn mprotect_raw(addr: usize, len: usize, prot: libc::c_int) -> bool {
    // SAFETY: the caller guarantees the range; changing its protection between read-only and
    // read-write invalidates no reference (writes fault into the handler meanwhile).
    unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) == 0 }
}

/// A region watched with `mprotect` and `SIGSEGV`. See the module docs.
pub(crate) struct MprotectWatch {
    slot: usize,
    addr: usize,
    shift: u32,
    npages: u64,
    /// Boxed: the registry points at it.
    bitmap: Box<DirtyBitmap>,
}

/// Holds a slot's flag from normal (not signal) context.
struct Held<'a>(&'a Slot, bool);

impl<'a> Held<'a> {
    fn take(slot: &'a Slot) -> Self {
        let took = slot.lock(gettid());
        Held(slot, took)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.unlock();
        }
    }
}

impl MprotectWatch {
    /// Watch `[addr, addr + len)`, pages of `page_size` bytes. The range must be a
    /// read-write mapping that stays mapped while watched (what
    /// [`HostRegion`](crate::HostRegion) guarantees); it must not overlap another
    /// `MprotectWatch`'s ([`HostError::AlreadyTracked`]). Installs the process's handler on
    /// first use; nothing is protected until [`arm`](WriteWatch::arm).
    pub(crate) fn new(addr: usize, len: u64, page_size: u64) -> Result<Self, HostError> {
        let (addr, len, shift) = fault_log::region_bounds(addr, len, page_size)?;
        install()?;
        let npages = (len >> shift) as u64;
        let bitmap = Box::new(DirtyBitmap::new(npages));
        let _claim = CLAIM.lock().unwrap_or_else(|e| e.into_inner());
        let end = addr + len;
        let mut free = None;
        for (i, s) in SLOTS.iter().enumerate() {
            if s.state.load(Ordering::Acquire) == FREE {
                free.get_or_insert(i);
                continue;
            }
            let (s0, s1) = (
                s.start.load(Ordering::Acquire),
                s.end.load(Ordering::Acquire),
            );
            if addr < s1 && s0 < end {
                return Err(HostError::AlreadyTracked {
                    addr: addr as u64,
                    len: len as u64,
                });
            }
        }
        let Some(slot) = free else {
            return Err(HostError::Sys {
                op: "mprotect watch",
                source: std::io::Error::other(format!(
                    "{MAX_WATCHES} regions are watched with mprotect already"
                )),
            });
        };
        let s = &SLOTS[slot];
        let _held = Held::take(s);
        s.start.store(addr, Ordering::Release);
        s.end.store(end, Ordering::Release);
        s.shift.store(shift, Ordering::Release);
        s.bitmap
            .store(&*bitmap as *const DirtyBitmap as *mut _, Ordering::Release);
        s.state.store(CLAIMED, Ordering::Release);
        Ok(MprotectWatch {
            slot,
            addr,
            shift,
            npages,
            bitmap,
        })
    }

    fn slot(&self) -> &'static Slot {
        &SLOTS[self.slot]
    }

    /// `mprotect` pages `first..first + n` (inside the region) to `prot`.
    fn mprotect_pages(&self, first: u64, n: u64, prot: libc::c_int) -> Result<(), HostError> {
        let addr = self.addr + ((first as usize) << self.shift);
        let len = (n as usize) << self.shift;
        // SAFETY: pages of the watched range (first + n <= npages, checked by the callers).
        if unsafe { mprotect_raw(addr, len, prot) } {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENOMEM) {
            // A hole in the range, or one mapping too many (every lone read-only or writable
            // page is a mapping of its own).
            crate::sys::check_mapped(addr as u64, len as u64)?;
            return Err(HostError::Sys {
                op: "mprotect (the process has vm.max_map_count mappings)",
                source,
            });
        }
        Err(HostError::Sys {
            op: "mprotect",
            source,
        })
    }
}

impl WriteWatch for MprotectWatch {
    fn page_size(&self) -> u64 {
        1 << self.shift
    }

    fn npages(&self) -> u64 {
        self.npages
    }

    fn arm(&self) -> Result<(), HostError> {
        let slot = self.slot();
        let _held = Held::take(slot);
        self.bitmap.clear_all();
        // Armed before protected: from the first protected page on, the handler knows it.
        slot.state.store(ARMED, Ordering::Release);
        if let Err(e) = self.mprotect_pages(0, self.npages, RO) {
            // Nothing stays protected behind a failed arm.
            let _ = self.mprotect_pages(0, self.npages, RW);
            slot.state.store(CLAIMED, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    fn harvest(&self, out: &mut [u64], reprotect: bool) -> Result<u64, HostError> {
        let slot = self.slot();
        let _held = Held::take(slot);
        if slot.state.load(Ordering::Acquire) != ARMED {
            return Err(HostError::NotStarted);
        }
        fault_log::harvest(&self.bitmap, out, reprotect, |first, n| {
            self.mprotect_pages(first, n, RO)
        })
    }

    fn protect(&self, first_page: u64, bits: &[u64]) -> Result<(), HostError> {
        let slot = self.slot();
        let _held = Held::take(slot);
        if slot.state.load(Ordering::Acquire) != ARMED {
            return Err(HostError::NotStarted);
        }
        fault_log::protect(&self.bitmap, first_page, bits, |first, n| {
            self.mprotect_pages(first, n, RO)
        })
    }

    fn disarm(&self) -> Result<(), HostError> {
        let slot = self.slot();
        let _held = Held::take(slot);
        if slot.state.load(Ordering::Acquire) != ARMED {
            return Ok(());
        }
        // Writable first, then disarmed: a fault racing this finds the page writable when
        // its handler retries the write.
        let r = self.mprotect_pages(0, self.npages, RW);
        slot.state.store(CLAIMED, Ordering::Release);
        DISARMS.fetch_add(1, Ordering::Release);
        r
    }
}

impl Drop for MprotectWatch {
    fn drop(&mut self) {
        let _ = self.disarm();
        let _claim = CLAIM.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.slot();
        let _held = Held::take(slot);
        slot.state.store(FREE, Ordering::Release);
        slot.bitmap.store(std::ptr::null_mut(), Ordering::Release);
        slot.start.store(0, Ordering::Release);
        slot.end.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::fault_log::testing::{self, Mapping, PAGE};

    /// n·64 + 3 pages, as the protocol tests use.
    const NPAGES: u64 = 64 * 3 + 3;

    fn watch(m: &Mapping) -> MprotectWatch {
        MprotectWatch::new(m.addr(), m.len(), PAGE).expect("MprotectWatch::new")
    }

    crate::fault_log::testing::shared_watch_tests!(watch, NPAGES);

    #[test]
    fn bad_ranges_are_refused() {
        let m = Mapping::anon(8);
        let a = m.addr();
        type Case = (usize, u64, u64, fn(&HostError) -> bool);
        let cases: [Case; 5] = [
            (a + 8, PAGE, PAGE, |e| {
                matches!(
                    e,
                    HostError::Unaligned {
                        what: "address",
                        ..
                    }
                )
            }),
            (a, PAGE + 1, PAGE, |e| {
                matches!(e, HostError::Unaligned { what: "length", .. })
            }),
            (a, 0, PAGE, |e| matches!(e, HostError::ZeroLength)),
            (a, PAGE, 3000, |e| matches!(e, HostError::BadPageSize(3000))),
            (usize::MAX & !4095, 2 * PAGE, PAGE, |e| {
                matches!(e, HostError::RangeOverflow { .. })
            }),
        ];
        for (i, (addr, len, ps, ok)) in cases.into_iter().enumerate() {
            let e = MprotectWatch::new(addr, len, ps).err();
            assert!(e.as_ref().is_some_and(ok), "case {i}: {e:?}");
        }
        // Overlapping watches are refused (the handler could not tell whose a fault is);
        // once the first is gone the range can be watched again.
        let first = MprotectWatch::new(a, 4 * PAGE, PAGE).expect("first");
        let e = MprotectWatch::new(a + 3 * PAGE as usize, 2 * PAGE, PAGE).err();
        assert!(matches!(e, Some(HostError::AlreadyTracked { .. })), "{e:?}");
        let beside = MprotectWatch::new(a + 4 * PAGE as usize, 4 * PAGE, PAGE).expect("beside");
        drop(first);
        MprotectWatch::new(a, 2 * PAGE, PAGE).expect("after the first is dropped");
        drop(beside);
    }

    #[test]
    fn a_region_unmapped_under_the_watch_is_a_typed_error() {
        let m = Mapping::anon(4);
        // Unmap the last page under the watch (the mapping's own munmap of it later fails
        // harmlessly).
        // SAFETY: a page of our own mapping that nothing references.
        unsafe {
            libc::munmap(
                (m.addr() + 3 * PAGE as usize) as *mut libc::c_void,
                PAGE as usize,
            )
        };
        let w = MprotectWatch::new(m.addr(), m.len(), PAGE).expect("new");
        let e = w.arm().err();
        assert!(matches!(e, Some(HostError::NotMapped { .. })), "{e:?}");
        // A failed arm leaves every page writable.
        m.word(0).store(1, Ordering::Relaxed);
    }

    /// The documented limit: the kernel's own writes into a protected page fail with EFAULT
    /// rather than fault (only userfaultfd sees them).
    #[test]
    fn a_system_call_writing_a_protected_page_gets_efault() {
        let m = Mapping::anon(4);
        let w = watch(&m);
        w.arm().expect("arm");
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let data = 42u64.to_ne_bytes();
        // SAFETY: 8 readable bytes into our own pipe.
        assert_eq!(unsafe { libc::write(fds[1], data.as_ptr().cast(), 8) }, 8);
        // SAFETY: the kernel checks the destination; a protected page gives EFAULT.
        let r = unsafe { libc::read(fds[0], (m.addr() + PAGE as usize) as *mut libc::c_void, 8) };
        let e = std::io::Error::last_os_error();
        // SAFETY: our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!((r, e.raw_os_error()), (-1, Some(libc::EFAULT)));
        let mut bits = [0u64; 1];
        assert_eq!(w.harvest(&mut bits, true).expect("harvest"), 0);
    }

    const CHILD: &str = "DIRTYLOG_HOST_MPROTECT_CHILD";

    /// In a child process (this test binary, re-run): arm a watch, make a tracked write, then
    /// fault as `how` says. Never returns normally if the handler passes the fault on.
    fn child(how: &str) {
        let m = Mapping::anon(4);
        let w = watch(&m);
        w.arm().expect("arm");
        m.word(1).store(1, Ordering::Relaxed);
        let mut bits = [0u64; 1];
        assert_eq!(w.harvest(&mut bits, true).expect("harvest"), 1);
        match how {
            "read-only" => {
                // SAFETY: a fresh read-only page; writing it below is the fault under test.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        PAGE as usize,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                // SAFETY: deliberately faults (SEGV_ACCERR outside every watched range).
                unsafe { std::ptr::write_volatile(p.cast::<u64>(), 1) };
            }
            "null" => {
                // SAFETY: deliberately faults (SEGV_MAPERR).
                unsafe { std::ptr::write_volatile(std::ptr::dangling_mut::<u64>(), 1) };
            }
            "stack-overflow" => {
                fn recurse(n: u64) -> u64 {
                    let buf = std::hint::black_box([n; 64]);
                    if buf[3] == u64::MAX {
                        return 0;
                    }
                    recurse(buf[3] + 1) + buf[5]
                }
                let t = std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn(|| recurse(0))
                    .expect("spawn");
                let _ = t.join();
            }
            _ => unreachable!("unknown child mode {how}"),
        }
        // Reaching here means the fault was swallowed.
        std::process::exit(0);
    }

    #[test]
    fn faults_outside_every_range_still_kill() {
        if let Ok(how) = std::env::var(CHILD) {
            child(&how);
            return;
        }
        let exe = std::env::current_exe().expect("current_exe");
        for (how, signal, stderr_has) in [
            ("read-only", libc::SIGSEGV, ""),
            ("null", libc::SIGSEGV, ""),
            // Rust's own handler, installed before ours, still reports a stack overflow.
            ("stack-overflow", libc::SIGABRT, "overflowed its stack"),
        ] {
            let out = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "mprotect::tests::faults_outside_every_range_still_kill",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, how)
                .output()
                .expect("run the child");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.signal(),
                Some(signal),
                "{how}: {:?}; stderr: {stderr}",
                out.status
            );
            assert!(stderr.contains(stderr_has), "{how}: stderr: {stderr}");
        }
    }
}
