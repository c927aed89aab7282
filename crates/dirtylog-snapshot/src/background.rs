//! Background mode: copy-before-write, as QEMU's `background-snapshot`.
//!
//! 1. Before the pause, guest memory is registered with a userfaultfd in write-protect mode
//!    (synchronous: not `WP_ASYNC`; a write to a protected page waits for our handler).
//! 2. Paused: harvest the tracker (a diff carries the pages written since the last member),
//!    save the vCPU and device state, and write-protect the member's pages
//!    (`UFFDIO_WRITEPROTECT`). Resume at once: the pause costs the state and the protection
//!    (one ioctl per region for a full member; per run of dirty pages for a small diff).
//! 3. A fault-handling thread takes each write to a protected page: it copies the page to the
//!    member (sparse file, `page × page_size`, zero pages left as holes) and only then lifts the
//!    page's protection (`UFFDIO_WRITEPROTECT` mode 0), which wakes the writer. The page is
//!    saved as it was at the pause.
//! 4. Meanwhile this thread saves every other page of the member in order, in runs of up to
//!    64 pages: claim, copy, write, lift. A page is claimed once (an atomic bit), by whichever
//!    thread comes first; the other leaves it alone (the claimer's lift wakes its writer).
//! 5. When every page is saved, the memory is unregistered (lifting any protection left) and
//!    the member is committed as in the other modes.
//!
//! Guest writes by KVM go through the host page tables (`get_user_pages` on the host mapping),
//! so the write-protection catches them as it catches the VMM's own writes; the fd traps
//! kernel-mode faults (it is opened without `UFFD_USER_MODE_ONLY` when the process may).
//!
//! **Failures.** If anything fails (a write, an ioctl), the first error is kept, every
//! protection is lifted at once (no writer stays blocked), both threads stop, and the member
//! is discarded ([`Snapshotter::abort`]: its pages go back to the pending set).
//!
//! **Requirements.** Each region's host mapping must be page-aligned and a whole number of
//! host pages, and the snapshot page size a multiple of the host's (private anonymous or
//! shmem memory; KVM test guests qualify). `CreateConfig::verify_source` does not apply: the
//! memory cannot be digested while paused without the pause growing with the memory; the
//! page hashes of what was written are the member's record, as in the other modes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dirtylog::bitmap::runs;
use dirtylog_host::uffd::{
    Fault, RegisterMode, Userfaultfd, Wakeup, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
};
use dirtylog_host::HostError;
use dirtylog_migrate::{MigrationSource, RegionMemory, Vcpus};

use crate::claims::{Claimed, Claims};
use crate::create::copy_from_guest;
use crate::write::Member;
use crate::{CreateConfig, Progress, SnapshotError, SnapshotMode, SnapshotStats, Snapshotter};

/// Pages saved by one step of the background sweep.
const RUN_PAGES: u64 = 64;
/// A diff with more runs of dirty pages than this is protected whole (one ioctl per region
/// in the pause); a page outside the diff that faults is then just released.
const MAX_PROTECT_RUNS: usize = 64;

/// A userfaultfd error as a snapshot error.
pub(crate) fn uffd_error(op: &'static str) -> impl FnOnce(HostError) -> SnapshotError {
    move |e| SnapshotError::Vm {
        op,
        source: Box::new(e),
    }
}

/// The host's base page size.
pub(crate) fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(r).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Check that the regions can be registered with a userfaultfd: page-aligned mappings of
/// whole host pages, and a snapshot page size that is a multiple of the host's.
pub(crate) fn check_uffd_layout(
    mems: &[RegionMemory],
    page_size: u64,
    what: &str,
) -> Result<(), SnapshotError> {
    let host = host_page_size();
    if page_size % host != 0 {
        return Err(SnapshotError::Usage(format!(
            "{what} needs a page size that is a multiple of the host's {host} bytes, not {page_size}"
        )));
    }
    for (i, m) in mems.iter().enumerate() {
        if m.as_ptr() as u64 % host != 0 || m.len() as u64 % host != 0 || m.is_empty() {
            return Err(SnapshotError::Usage(format!(
                "{what} needs page-aligned guest memory (userfaultfd works on whole host \
                 pages): region {i} is mapped at {:#x}, {} bytes; use stop or live mode \
                 (or an eager restore) for this VM",
                m.as_ptr() as u64,
                m.len()
            )));
        }
    }
    Ok(())
}

/// Write the next member of `snap` in background mode. See the [module docs](self).
pub(crate) fn take<S: MigrationSource>(
    snap: &mut Snapshotter<'_, S>,
    cfg: &CreateConfig,
) -> Result<SnapshotStats, SnapshotError> {
    let page = u64::from(snap.header.page_size());
    check_uffd_layout(&snap.mems, page, "background mode")?;
    let wp = Protection::new(&snap.mems, page)?;
    snap.begin(SnapshotMode::Background)?;
    // Every page saved: unregister (nothing is left protected), then commit.
    match run(snap, &wp, cfg).and_then(|()| wp.release()) {
        Ok(()) => snap.commit(),
        Err(e) => {
            // Lift every protection before anything else (drop would too).
            drop(wp);
            snap.abort();
            Err(e)
        }
    }
}

fn run<S: MigrationSource>(
    snap: &mut Snapshotter<'_, S>,
    wp: &Protection,
    cfg: &CreateConfig,
) -> Result<(), SnapshotError> {
    let full = snap.next_is_full();
    let vcpus = snap.source().vcpus();
    let t = Instant::now();
    vcpus.pause().map_err(SnapshotError::vm("pause"))?;
    let paused = (|| {
        snap.harvest()?;
        let set = snap.take_pending(full)?;
        snap.save_states()?;
        wp.protect(&set)?;
        Ok::<_, SnapshotError>(set)
    })();
    if paused.is_err() {
        // Nothing must stay protected once the guest runs with nobody serving faults.
        wp.lift_all();
    }
    let resumed = vcpus.resume().map_err(SnapshotError::vm("resume"));
    snap.pause += t.elapsed();
    snap.rounds = 1;
    let set = paused?;
    resumed?;
    let member = snap
        .member
        .as_ref()
        .ok_or_else(|| SnapshotError::Usage("no member is open".into()))?;
    save(wp, member, &snap.mems, &set, cfg)
}

/// The registration of guest memory with a userfaultfd in write-protect mode. Dropping it
/// lifts every protection and unregisters (best effort), so no writer can stay blocked.
pub(crate) struct Protection {
    uffd: Userfaultfd,
    /// (host address, length) of each region registered.
    ranges: Vec<(u64, u64)>,
    /// The snapshot's page size.
    page: u64,
    registered: AtomicBool,
}

impl Protection {
    /// Register every region (write-protect mode). Untouched pages are protected too: with
    /// `UFFD_FEATURE_WP_UNPOPULATED` when the kernel offers it (Linux ≥ 6.4), else by mapping
    /// them first (`MADV_POPULATE_READ`: the shared zero page, no memory used).
    fn new(mems: &[RegionMemory], page: u64) -> Result<Self, SnapshotError> {
        let want = u64::from(UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
        let uffd = Userfaultfd::new(want).map_err(uffd_error("userfaultfd"))?;
        let unpopulated = uffd.features() & u64::from(UFFD_FEATURE_WP_UNPOPULATED) != 0;
        let mut p = Protection {
            uffd,
            ranges: Vec::new(),
            page,
            registered: AtomicBool::new(true),
        };
        for m in mems {
            let (addr, len) = (m.as_ptr() as u64, m.len() as u64);
            if !unpopulated {
                // SAFETY: MADV_POPULATE_READ maps the pages of a live mapping (the memory
                // contract keeps it valid) for reading; it changes no contents.
                let r = unsafe {
                    libc::madvise(
                        addr as *mut libc::c_void,
                        len as usize,
                        libc::MADV_POPULATE_READ,
                    )
                };
                if r != 0 {
                    return Err(uffd_error("madvise")(HostError::Sys {
                        op: "madvise(MADV_POPULATE_READ)",
                        source: std::io::Error::last_os_error(),
                    }));
                }
            }
            let ioctls = p
                .uffd
                .register(
                    addr,
                    len,
                    RegisterMode {
                        missing: false,
                        write_protect: true,
                    },
                )
                .map_err(uffd_error("UFFDIO_REGISTER"))?;
            p.ranges.push((addr, len));
            if ioctls & (1 << UFFDIO_WRITEPROTECT_BIT) == 0 {
                return Err(SnapshotError::Usage(format!(
                    "background mode: the kernel cannot write-protect guest memory at {addr:#x} \
                     with userfaultfd (no UFFDIO_WRITEPROTECT for this mapping); use stop or \
                     live mode"
                )));
            }
        }
        Ok(p)
    }

    /// While paused: write-protect the pages of `set` (per region, KVM-order words).
    fn protect(&self, set: &[Vec<u64>]) -> Result<(), SnapshotError> {
        for (i, words) in set.iter().enumerate() {
            let (addr, len) = self.ranges[i];
            let nruns = runs(words).take(MAX_PROTECT_RUNS + 1).count();
            if nruns == 0 {
                continue;
            }
            if nruns > MAX_PROTECT_RUNS {
                self.uffd
                    .writeprotect(addr, len, true)
                    .map_err(uffd_error("UFFDIO_WRITEPROTECT"))?;
                continue;
            }
            for (first, n) in runs(words) {
                self.uffd
                    .writeprotect(addr + first * self.page, n * self.page, true)
                    .map_err(uffd_error("UFFDIO_WRITEPROTECT"))?;
            }
        }
        Ok(())
    }

    /// Lift the protection of pages `first..first + n` of region `r`, waking their writers.
    fn lift(&self, r: usize, first: u64, n: u64) -> Result<(), SnapshotError> {
        let (addr, _) = self.ranges[r];
        self.uffd
            .writeprotect(addr + first * self.page, n * self.page, false)
            .map_err(uffd_error("UFFDIO_WRITEPROTECT"))
    }

    /// Lift every protection (best effort; the unregister of drop follows anyway).
    fn lift_all(&self) {
        for &(addr, len) in &self.ranges {
            let _ = self.uffd.writeprotect(addr, len, false);
        }
    }

    /// The region and page of host address `addr`, if it is in one.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.ranges
            .iter()
            .position(|&(a, l)| addr >= a && addr - a < l)
            .map(|r| (r, (addr - self.ranges[r].0) / self.page))
    }

    /// Unregister every region (lifting what protection is left).
    fn release(&self) -> Result<(), SnapshotError> {
        if !self.registered.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut first = None;
        for &(addr, len) in &self.ranges {
            if let Err(e) = self.uffd.unregister(addr, len) {
                let _ = self.uffd.writeprotect(addr, len, false);
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(uffd_error("UFFDIO_UNREGISTER")(e)),
        }
    }
}

impl Drop for Protection {
    fn drop(&mut self) {
        if self.registered.load(Ordering::Acquire) {
            self.lift_all();
            let _ = self.release();
        }
        // Closing the fd then unregisters whatever is left and wakes every waiter.
    }
}

/// `_UFFDIO_WRITEPROTECT`: the bit of the ioctls a registered range supports.
const UFFDIO_WRITEPROTECT_BIT: u32 = 6;

/// What the fault thread and the sweep share.
struct Saver<'a> {
    wp: &'a Protection,
    member: &'a Member,
    mems: &'a [RegionMemory],
    page: u64,
    /// The member's pages, per region.
    set: &'a [Vec<u64>],
    /// Pages claimed for saving (by either thread), per region.
    claims: Claims,
    /// Pages saved.
    done: AtomicU64,
    total: u64,
    /// Set on the first failure: both threads stop.
    failed: AtomicBool,
    failure: Mutex<Option<SnapshotError>>,
    /// Tells the fault thread to stop.
    wakeup: Wakeup,
    /// Faults served (pages saved by the fault thread, and releases of pages outside the set).
    faults: AtomicU64,
}

impl Saver<'_> {
    fn in_set(&self, r: usize, p: u64) -> bool {
        self.set[r]
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// Record the first failure and lift every protection, so that no writer stays blocked.
    fn fail(&self, e: SnapshotError) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(e);
        self.failed.store(true, Ordering::Release);
        self.wp.lift_all();
    }

    /// Copy the claimed pages `first..first + n` of region `r` (still protected, so as at
    /// the pause) into the member, then lift their protection.
    fn save_run(&self, r: usize, first: u64, n: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let bytes = (n * self.page) as usize;
        let b = &mut buf[..bytes];
        copy_from_guest(self.mems[r], (first * self.page) as usize, b);
        self.member.write_run(r, first, b)?;
        self.wp.lift(r, first, n)?;
        self.done.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// The fault thread: until woken to stop (or failed), save each page written to before
    /// lifting its protection.
    fn serve_faults(&self) {
        let mut faults = Vec::with_capacity(dirtylog_host::uffd::MSG_BATCH);
        let mut buf = vec![0u8; self.page as usize];
        loop {
            let ready = match self.wp.uffd.poll(Some(&self.wakeup), 100) {
                Ok(r) => r,
                Err(e) => return self.fail(uffd_error("poll(userfaultfd)")(e)),
            };
            if ready.faults {
                if let Err(e) = self.wp.uffd.read_faults(&mut faults) {
                    return self.fail(uffd_error("read(userfaultfd)")(e));
                }
                for f in &faults {
                    if let Err(e) = self.fault(*f, &mut buf) {
                        return self.fail(e);
                    }
                }
            }
            if ready.wakeup || self.failed.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// One fault message.
    fn fault(&self, f: Fault, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let Fault::Page {
            addr,
            write_protect: true,
            ..
        } = f
        else {
            return Ok(());
        };
        let Some((r, p)) = self.wp.locate(addr) else {
            return Ok(());
        };
        self.faults.fetch_add(1, Ordering::Relaxed);
        if !self.in_set(r, p) {
            // Protected with its whole region, but not part of this member.
            return self.wp.lift(r, p, 1);
        }
        if self.claims.claim(r, p) {
            self.save_run(r, p, 1, buf)?;
        }
        // Else the sweep has it: its lift wakes the writer.
        Ok(())
    }

    /// The sweep: every page of the set in order, in runs of up to [`RUN_PAGES`] claimed
    /// pages.
    fn sweep(&self, progress: Option<&crate::create::ProgressFn>) -> Result<(), SnapshotError> {
        let mut buf = vec![0u8; (RUN_PAGES * self.page) as usize];
        let total_bytes = self.total * self.page;
        for (r, words) in self.set.iter().enumerate() {
            for (first, n) in runs(words) {
                let stop = || self.failed.load(Ordering::Acquire);
                self.claims
                    .claim_runs(r, (first, first + n), RUN_PAGES, stop, |claimed| {
                        let Claimed::Run { first, n } = claimed else {
                            return Ok(());
                        };
                        self.save_run(r, first, n, &mut buf)?;
                        if let Some(f) = progress {
                            f(Progress {
                                phase: "background",
                                done_bytes: self.done.load(Ordering::Relaxed) * self.page,
                                total_bytes,
                            });
                        }
                        Ok(())
                    })?;
                if self.failed.load(Ordering::Acquire) {
                    return Ok(());
                }
            }
        }
        // Pages the fault thread claimed may still be in flight.
        while self.done.load(Ordering::Acquire) < self.total && !self.failed.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
}

/// After the resume: save the pages of `set` into `member`, each before the guest's first
/// write to it, the rest in order. Returns once every page is saved (or on the first error,
/// with every protection lifted).
fn save(
    wp: &Protection,
    member: &Member,
    mems: &[RegionMemory],
    set: &[Vec<u64>],
    cfg: &CreateConfig,
) -> Result<(), SnapshotError> {
    let total = set
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum();
    let saver = Saver {
        wp,
        member,
        mems,
        page: wp.page,
        set,
        claims: Claims::new(set.iter().map(|w| w.len() as u64 * 64)),
        done: AtomicU64::new(0),
        total,
        failed: AtomicBool::new(false),
        failure: Mutex::new(None),
        wakeup: Wakeup::new().map_err(uffd_error("eventfd"))?,
        faults: AtomicU64::new(0),
    };
    std::thread::scope(|s| {
        let handler = std::thread::Builder::new()
            .name("snapshot-uffd".into())
            .spawn_scoped(s, || saver.serve_faults())
            .map_err(|e| SnapshotError::io("spawn", std::path::Path::new("snapshot-uffd"), e));
        let handler = match handler {
            Ok(h) => h,
            Err(e) => {
                saver.fail(e);
                return;
            }
        };
        if let Err(e) = saver.sweep(cfg.progress.as_ref()) {
            saver.fail(e);
        }
        // Every page is saved (or it failed): no protected page of the set is left, so the
        // handler can stop. Pages outside the set stay protected until the unregister.
        if let Err(e) = saver.wakeup.signal() {
            saver.fail(uffd_error("eventfd")(e));
            // It cannot be told to stop: unregister instead, which wakes every waiter; the
            // handler then stops on the failure flag at its next message.
            let _ = wp.release();
        }
        let _ = handler.join();
    });
    let failure = saver
        .failure
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
