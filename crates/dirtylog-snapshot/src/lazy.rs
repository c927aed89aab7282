//! Lazy restore: resume the guest before its memory is loaded, serve each first touch from the
//! chain through userfaultfd `MISSING` faults, and load the rest in the background
//! (Firecracker's page-fault handler, with a prefetcher).
//!
//! 1. Open the chain (manifests, parent links and file lengths are checked; the chunk
//!    checksums are not read, which would cost a read of all memory before the resume: the
//!    memory digest checks the data instead, below), parse the vCPU and device state, build
//!    the target.
//! 2. Register the target's guest memory (fresh anonymous memory that nobody has touched) with
//!    a userfaultfd in `MISSING` mode. Pages that are already there (a target that pre-faults
//!    its memory) are loaded at once with plain copies, before anything runs.
//! 3. Start the fault-handling thread, restore the vCPU and device state, resume the guest.
//! 4. The fault thread serves each first touch of a missing page: `UFFDIO_COPY` of the page as
//!    of the tip ([`Chain::read_pages`]), or `UFFDIO_ZEROPAGE` for a zero page; either wakes
//!    the toucher. Meanwhile this thread loads every other page that may hold data (the
//!    chain's data runs: pages outside the holes of their owner's file) in order, in runs of
//!    up to 64 pages. A page is claimed once (an atomic bit) by whichever thread comes first;
//!    the other leaves it alone (the claimer's fill wakes its waiters). Holes are never read:
//!    they are zero as of the tip, and stay missing until touched.
//! 5. When every data page is in, the fault thread is stopped (it finishes its fills first)
//!    and the memory is unregistered: the pages still missing are holes, which the kernel
//!    then fills with zeros at their first touch. The digest of what was loaded (page hashes
//!    recorded as pages were filled, zero's for the rest) is compared with the tip's `memory-xxh3`. A
//!    mismatch (a corrupted file) fails the restore with an error naming the tip: the target,
//!    and so the guest, is dropped — stopped.
//!
//! **Failures.** On the first error (a read, an ioctl) both threads stop and every region is
//! unregistered at once: the missing pages then read as zeros, so no toucher stays blocked;
//! the restore fails and the target is dropped. A page found filled by someone else (not
//! possible for memory only the VM touches) is such an error.
//!
//! **Requirements.** As for background mode: page-aligned mappings of whole host pages, and
//! anonymous (or shmem) memory; [`RestoreOptions::resume`] off loads every page this way
//! without resuming.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use dirtylog_host::uffd::{Fault, Fill, RegisterMode, Userfaultfd, Wakeup};
use dirtylog_migrate::digest::DigestTable;
use dirtylog_migrate::wire::StreamHeader;
use dirtylog_migrate::{MigrationTarget, RegionMemory, VcpuRestore, VmError};

use crate::background::{check_uffd_layout, host_page_size, uffd_error};
use crate::chain::Chain;
use crate::claims::{Claimed, Claims};
use crate::restore::{restore_states, target_memory};
use crate::write::is_zero;
use crate::{Progress, ProgressFn, RestoreOptions, RestoreStats, SnapshotError};

/// Pages loaded by one step of the prefetcher.
const RUN_PAGES: u64 = 64;
/// Pages of a block, the unit the prefetch workers share out (16 MiB).
const BLOCK_PAGES: u64 = 4096;
/// Prefetch workers of [`load_all`] (nothing runs meanwhile: a small host's two cores). A lazy
/// restore prefetches on one thread, leaving the rest to the running guest.
const LOAD_WORKERS: u64 = 2;
/// `_UFFDIO_COPY` and `_UFFDIO_ZEROPAGE`: bits of the ioctls a registered range supports.
const UFFDIO_COPY_BIT: u32 = 3;
const UFFDIO_ZEROPAGE_BIT: u32 = 4;

/// Restore the chain ending at `tip` lazily. See the [module docs](self).
pub(crate) fn restore<T, F>(
    tip: &Path,
    make_target: F,
    opts: &RestoreOptions,
) -> Result<(T, RestoreStats), SnapshotError>
where
    T: MigrationTarget,
    F: FnOnce(&StreamHeader) -> Result<T, VmError>,
{
    let t0 = Instant::now();
    let chain = Chain::open(tip, false)?;
    // Parse the states and the digests before any target exists.
    chain.vcpu_states()?;
    chain.device_sections()?;
    let digests = chain.memory_digests()?;
    let target = make_target(chain.header()).map_err(SnapshotError::vm("create the target VM"))?;
    let mems = target_memory(&target, chain.header())?;
    let page = u64::from(chain.header().page_size());
    check_uffd_layout(&mems, page, "lazy restore")?;
    let loader = Loader::new(&chain, &mems, page)?;
    let mut time_to_resume = None;
    let outcome = loader.run(opts.progress.as_ref(), 1, || {
        restore_states(&chain, &target)?;
        if opts.resume {
            target
                .vcpus()
                .resume()
                .map_err(SnapshotError::vm("resume"))?;
        }
        time_to_resume = Some(t0.elapsed());
        Ok(())
    });
    // Unregister before anything else: from here on the memory is the guest's alone.
    let released = loader.release();
    outcome?;
    released?;
    let tc = Instant::now();
    for ((r, table), want) in chain
        .header()
        .regions()
        .iter()
        .zip(&loader.tables)
        .zip(digests)
    {
        let got = table.digest();
        if got != want {
            return Err(SnapshotError::HashMismatch {
                slot: r.slot,
                at: format!(
                    "after a lazy restore of {}: the memory loaded differs from the snapshot's \
                     record (a member's file is corrupted; `dirtylog snapshot verify` names it); \
                     the guest was stopped",
                    tip.display()
                ),
                expected: want,
                actual: got,
            });
        }
    }
    let check = tc.elapsed();
    let duration = t0.elapsed();
    let bytes = loader.bytes_read.load(Ordering::Relaxed);
    Ok((
        target,
        RestoreStats {
            members: chain.members().len(),
            pages: loader.data_pages.load(Ordering::Relaxed),
            bytes_read: bytes,
            time_to_resume: time_to_resume.unwrap_or(duration),
            duration,
            check,
            lazy: true,
            resumed: opts.resume,
            throughput_bytes_per_sec: (bytes as f64 / duration.as_secs_f64().max(1e-9)) as u64,
        },
    ))
}

/// What [`load_all`] loaded.
pub(crate) struct LoadedMemory {
    /// Per region, the hashes of the pages as loaded (zero pages: zero's).
    pub(crate) tables: Vec<DigestTable>,
    /// Bytes read from the memory files.
    pub(crate) bytes_read: u64,
    /// Non-zero pages loaded.
    pub(crate) data_pages: u64,
}

/// Load the chain's memory into `mems` (fresh target memory; nothing runs) through the lazy
/// restore's path without resuming anything: `UFFDIO_COPY` of the data runs, the holes left
/// untouched (they read as zeros). Faster than copying into the target's memory with `read`:
/// no page is zero-filled before being overwritten (the kernel clears every fresh anonymous
/// page, and a fresh transparent huge page costs a 2 MiB clear at its first touch), and the
/// zero pages are never touched at all. Returns the page hashes for the digest check, or
/// `None` (nothing loaded) when this memory cannot be filled through userfaultfd (not
/// page-aligned, not anonymous, no userfaultfd): the caller then copies with `read`.
pub(crate) fn load_all(
    chain: &Chain,
    mems: &[RegionMemory],
    page: u64,
    progress: Option<&ProgressFn>,
) -> Result<Option<LoadedMemory>, SnapshotError> {
    if check_uffd_layout(mems, page, "loading through userfaultfd").is_err() {
        return Ok(None);
    }
    let Ok(mut loader) = Loader::new(chain, mems, page) else {
        return Ok(None);
    };
    // Reported as the eager restore's phase.
    let progress: Option<ProgressFn> = progress.map(|f| {
        let f = f.clone();
        std::sync::Arc::new(move |p: Progress| {
            f(Progress {
                phase: "restore",
                ..p
            })
        }) as ProgressFn
    });
    let outcome = loader.run(progress.as_ref(), LOAD_WORKERS, || Ok(()));
    let released = loader.release();
    outcome?;
    released?;
    Ok(Some(LoadedMemory {
        tables: std::mem::take(&mut loader.tables),
        bytes_read: loader.bytes_read.load(Ordering::Relaxed),
        data_pages: loader.data_pages.load(Ordering::Relaxed),
    }))
}

/// Serves a target's memory from a chain: registration, fault thread, prefetcher.
pub(crate) struct Loader<'a> {
    chain: &'a Chain,
    uffd: Userfaultfd,
    /// (host address, length) of each region registered.
    ranges: Vec<(u64, u64)>,
    page: u64,
    registered: AtomicBool,
    /// Pages claimed for loading (by either thread), per region.
    claims: Claims,
    /// The hashes of the pages loaded, per region.
    tables: Vec<DigestTable>,
    done: AtomicU64,
    /// Pages of the data runs done by the prefetchers (loaded, or claimed by the fault thread).
    loaded: AtomicU64,
    /// Per region, the runs of pages that may hold data as of the tip, in page order.
    data_runs: Vec<Vec<(u64, u64)>>,
    /// Pages in `data_runs`.
    data_total: u64,
    bytes_read: AtomicU64,
    /// Non-zero pages loaded.
    data_pages: AtomicU64,
    /// Faults served by the fault thread.
    faults: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<SnapshotError>>,
    wakeup: Wakeup,
}

impl<'a> Loader<'a> {
    /// Register `mems` (the target's regions, in the chain header's order) in `MISSING` mode and
    /// load at once any page already present in them.
    pub(crate) fn new(
        chain: &'a Chain,
        mems: &[RegionMemory],
        page: u64,
    ) -> Result<Self, SnapshotError> {
        let uffd = Userfaultfd::new(0).map_err(uffd_error("userfaultfd"))?;
        let npages: Vec<u64> = mems.iter().map(|m| m.len() as u64 / page).collect();
        let data_runs: Vec<Vec<(u64, u64)>> = (0..mems.len())
            .map(|r| {
                let mut runs: Vec<(u64, u64)> = (0..chain.members().len())
                    .flat_map(|m| chain.data_runs(m, r))
                    .collect();
                runs.sort_unstable();
                runs
            })
            .collect();
        let data_total = data_runs.iter().flatten().map(|r| r.1).sum();
        let mut l = Loader {
            chain,
            uffd,
            ranges: Vec::new(),
            page,
            registered: AtomicBool::new(true),
            claims: Claims::new(npages.iter().copied()),
            tables: npages
                .iter()
                .map(|&n| DigestTable::new(n as usize, page as usize))
                .collect(),
            done: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            data_runs,
            data_total,
            bytes_read: AtomicU64::new(0),
            data_pages: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            wakeup: Wakeup::new().map_err(uffd_error("eventfd"))?,
        };
        for m in mems {
            let (addr, len) = (m.as_ptr() as u64, m.len() as u64);
            let ioctls = l
                .uffd
                .register(
                    addr,
                    len,
                    RegisterMode {
                        missing: true,
                        write_protect: false,
                    },
                )
                .map_err(uffd_error("UFFDIO_REGISTER"))?;
            l.ranges.push((addr, len));
            let want = (1u64 << UFFDIO_COPY_BIT) | (1 << UFFDIO_ZEROPAGE_BIT);
            if ioctls & want != want {
                return Err(SnapshotError::Usage(format!(
                    "lazy restore: the target's memory at {addr:#x} cannot be filled through \
                     userfaultfd (no UFFDIO_COPY/ZEROPAGE for this mapping); restore eagerly"
                )));
            }
        }
        for (r, m) in mems.iter().enumerate() {
            l.load_present(r, *m)?;
        }
        Ok(l)
    }

    /// Load the pages of region `r` that are already in memory (registered after they were
    /// touched: no fault will come for them) with plain copies. Before any resume.
    fn load_present(&self, r: usize, mem: RegionMemory) -> Result<(), SnapshotError> {
        let host = host_page_size();
        let mut vec = vec![0u8; mem.len() / host as usize];
        // SAFETY: mincore reads the residency of a live, page-aligned mapping (checked by
        // `check_uffd_layout`) into `vec`, one byte per host page, which is that long.
        let rc = unsafe { libc::mincore(mem.as_ptr().cast(), mem.len(), vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(uffd_error("mincore")(dirtylog_host::HostError::Sys {
                op: "mincore",
                source: std::io::Error::last_os_error(),
            }));
        }
        let per = (self.page / host) as usize;
        let mut buf = vec![0u8; self.page as usize];
        for (p, hosts) in vec.chunks(per).enumerate() {
            if hosts.iter().all(|b| b & 1 == 0) {
                continue;
            }
            let p = p as u64;
            self.claims.claim(r, p);
            self.chain.read_pages(r, p, &mut buf)?;
            self.bytes_read.fetch_add(self.page, Ordering::Relaxed);
            let off = (p * self.page) as usize;
            // SAFETY: page `p` is inside the region's mapping (mincore covered exactly the
            // mapping), which the target keeps valid; nobody but this restore touches target
            // memory before the resume, which has not happened (memory contract), so the
            // exclusive slice aliases nothing for its short life. The page is present, so
            // writing it does not fault.
            let dst = unsafe { std::slice::from_raw_parts_mut(mem.as_ptr().add(off), buf.len()) };
            dst.copy_from_slice(&buf);
            self.record(r, p, &buf);
            self.done.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Record the hashes of the pages `first..` loaded as `data`.
    fn record(&self, r: usize, first: u64, data: &[u8]) {
        for (k, pg) in data.chunks_exact(self.page as usize).enumerate() {
            if is_zero(pg) {
                self.tables[r].record_zero(first + k as u64, 1);
            } else {
                self.tables[r].record(first + k as u64, pg);
                self.data_pages.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Record the first failure and unregister everything, so that the missing pages read as
    /// zeros and nobody stays blocked.
    fn fail(&self, e: SnapshotError) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(e);
        self.failed.store(true, Ordering::Release);
        drop(f);
        let _ = self.release();
    }

    /// Load the claimed pages `first..first + n` of region `r` from the chain: `UFFDIO_COPY`
    /// for the runs of non-zero pages, `UFFDIO_ZEROPAGE` for the zero ones. Wakes the waiters.
    fn fill(&self, r: usize, first: u64, n: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let page = self.page as usize;
        let b = &mut buf[..n as usize * page];
        self.chain.read_pages(r, first, b)?;
        self.bytes_read.fetch_add(b.len() as u64, Ordering::Relaxed);
        let (addr, _) = self.ranges[r];
        let mut k = 0usize;
        let np = n as usize;
        while k < np {
            let zero = is_zero(&b[k * page..(k + 1) * page]);
            let mut e = k + 1;
            while e < np && is_zero(&b[e * page..(e + 1) * page]) == zero {
                e += 1;
            }
            let dst = addr + (first + k as u64) * self.page;
            let len = ((e - k) * page) as u64;
            self.fill_range(dst, &b[k * page..e * page], len, zero)?;
            k = e;
        }
        self.record(r, first, b);
        self.done.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// Fill `len` bytes at `dst` (claimed, missing pages) with `data`, or with zeros.
    fn fill_range(&self, dst: u64, data: &[u8], len: u64, zero: bool) -> Result<(), SnapshotError> {
        let mut off = 0u64;
        while off < len {
            let got = if zero {
                self.uffd.zeropage(dst + off, len - off)
            } else {
                // SAFETY: the destination is target memory registered `MISSING` on this fd,
                // which nobody but the VM touches once resumed and nobody at all before; its
                // missing pages are unreadable until filled, so no Rust reference relies on
                // them staying zero.
                unsafe { self.uffd.copy(dst + off, &data[off as usize..]) }
            };
            match got.map_err(uffd_error(if zero {
                "UFFDIO_ZEROPAGE"
            } else {
                "UFFDIO_COPY"
            }))? {
                Fill::Filled(n) if n > 0 => off += n,
                Fill::Filled(_) | Fill::Exists => {
                    return Err(SnapshotError::Usage(format!(
                        "lazy restore: the target page at {:#x} was filled behind the \
                         restore's back (something touched the target's memory outside the \
                         VM); the restore was stopped",
                        dst + off
                    )));
                }
            }
        }
        Ok(())
    }

    /// The region and page of host address `addr`, if it is in one.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.ranges
            .iter()
            .position(|&(a, l)| addr >= a && addr - a < l)
            .map(|r| (r, (addr - self.ranges[r].0) / self.page))
    }

    /// The fault thread: serve each first touch until woken to stop (or failed).
    fn serve_faults(&self) {
        let mut faults = Vec::with_capacity(dirtylog_host::uffd::MSG_BATCH);
        let mut buf = vec![0u8; self.page as usize];
        loop {
            let ready = match self.uffd.poll(Some(&self.wakeup), 100) {
                Ok(r) => r,
                Err(e) => return self.fail(uffd_error("poll(userfaultfd)")(e)),
            };
            if ready.faults {
                if let Err(e) = self.uffd.read_faults(&mut faults) {
                    return self.fail(uffd_error("read(userfaultfd)")(e));
                }
                for f in &faults {
                    let Fault::Page { addr, .. } = *f else {
                        continue;
                    };
                    let Some((r, p)) = self.locate(addr) else {
                        continue;
                    };
                    self.faults.fetch_add(1, Ordering::Relaxed);
                    if self.claims.claim(r, p) {
                        if let Err(e) = self.fill(r, p, 1, &mut buf) {
                            return self.fail(e);
                        }
                    }
                    // Else the prefetcher has it: its fill wakes the toucher.
                }
            }
            if ready.wakeup || self.failed.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// The prefetcher: every page that may hold data (the chain's data runs: pages of their
    /// owner's file outside its holes) not claimed yet, in order, in runs of up to
    /// [`RUN_PAGES`]. The other pages are holes of their owner, zero as of the tip: they are
    /// left missing (the fault thread fills a touched one with zeros; after the release, an
    /// untouched one reads as zeros from the kernel) and their digest entries stay zero's.
    /// Pages the fault thread claimed are filled by it before it stops (see [`run`](Self::run)).
    ///
    /// With `parts > 1`, this is worker `part` of `parts`: the runs are cut in blocks of
    /// [`BLOCK_PAGES`], and this worker loads every `parts`-th block from its `part`-th.
    fn prefetch(
        &self,
        progress: Option<&ProgressFn>,
        part: u64,
        parts: u64,
    ) -> Result<(), SnapshotError> {
        let mut buf = vec![0u8; (RUN_PAGES * self.page) as usize];
        let total_bytes = self.data_total * self.page;
        let mut block = 0u64;
        for (r, runs) in self.data_runs.iter().enumerate() {
            for &(run_first, run_n) in runs {
                let run_end = run_first + run_n;
                let mut first = run_first;
                while first < run_end {
                    let end = (first + BLOCK_PAGES).min(run_end);
                    let mine = block % parts == part;
                    block += 1;
                    if mine {
                        self.prefetch_range(r, first, end, &mut buf, progress, total_bytes)?;
                    }
                    first = end;
                }
            }
        }
        Ok(())
    }

    /// Load the pages `first..end` of region `r` not claimed yet (see [`prefetch`](Self::prefetch)).
    fn prefetch_range(
        &self,
        r: usize,
        first: u64,
        end: u64,
        buf: &mut [u8],
        progress: Option<&ProgressFn>,
        total_bytes: u64,
    ) -> Result<(), SnapshotError> {
        let stop = || self.failed.load(Ordering::Acquire);
        self.claims
            .claim_runs(r, (first, end), RUN_PAGES, stop, |claimed| {
                let Claimed::Run { first, n } = claimed else {
                    self.loaded.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                };
                self.fill(r, first, n, buf)?;
                let loaded = self.loaded.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(f) = progress {
                    f(Progress {
                        phase: "lazy",
                        done_bytes: loaded * self.page,
                        total_bytes,
                    });
                }
                Ok(())
            })
    }

    /// Start the fault thread, call `start` (restore the state, resume the guest), prefetch
    /// on `workers` threads (this one and `workers - 1` more) until every data page is in,
    /// stop the fault thread. The first error of any of them.
    pub(crate) fn run(
        &self,
        progress: Option<&ProgressFn>,
        workers: u64,
        start: impl FnOnce() -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        std::thread::scope(|s| {
            let handler = std::thread::Builder::new()
                .name("restore-uffd".into())
                .spawn_scoped(s, || self.serve_faults())
                .map_err(|e| SnapshotError::io("spawn", Path::new("restore-uffd"), e));
            let handler = match handler {
                Ok(h) => h,
                Err(e) => return self.fail(e),
            };
            match start() {
                Ok(()) => {
                    let parts = workers.max(1);
                    let mut helpers = Vec::new();
                    for part in 1..parts {
                        let h = std::thread::Builder::new()
                            .name("restore-load".into())
                            .spawn_scoped(s, move || {
                                if let Err(e) = self.prefetch(progress, part, parts) {
                                    self.fail(e);
                                }
                            });
                        match h {
                            Ok(h) => helpers.push(h),
                            Err(e) => {
                                self.fail(SnapshotError::io("spawn", Path::new("restore-load"), e))
                            }
                        }
                    }
                    if let Err(e) = self.prefetch(progress, 0, parts) {
                        self.fail(e);
                    }
                    for h in helpers {
                        let _ = h.join();
                    }
                }
                Err(e) => self.fail(e),
            }
            if let Err(e) = self.wakeup.signal() {
                // It cannot be told to stop: failing unregisters everything, so no more
                // faults come, and it stops at its next message.
                self.fail(uffd_error("eventfd")(e));
            }
            let _ = handler.join();
        });
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Unregister every region (missing pages then read as zeros; waiters are woken).
    pub(crate) fn release(&self) -> Result<(), SnapshotError> {
        if !self.registered.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut first = None;
        for &(addr, len) in &self.ranges {
            if let Err(e) = self.uffd.unregister(addr, len) {
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(uffd_error("UFFDIO_UNREGISTER")(e)),
        }
    }
}

impl Drop for Loader<'_> {
    fn drop(&mut self) {
        let _ = self.release();
        // Closing the fd then unregisters whatever is left and wakes every waiter.
    }
}
