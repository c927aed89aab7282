//! Host memory as a [`SelftestBackend`]: the kernel's `dirty_log_test` protocol, unchanged, on
//! the third source of writes. Writer threads take the place of vCPUs and stamp the iteration
//! number into random pages of a [`HostMemory`] watched by a [`HostDirtyTracker`]; the
//! protocol's checker (in `dirtylog::selftest`) is the same one the software MMU and
//! `/dev/kvm` answer to.
//!
//! Collection per mode, as the kernel test does it: dirty-log harvests (which re-protects what
//! it reports); clear-log harvests a snapshot and clears exactly the harvested pages. A ring
//! has no meaning for host memory (no vCPUs queue their writes) and is refused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use dirtylog::selftest::{BackendError, Collected, SelftestBackend, SelftestConfig};
use dirtylog::{DirtyTracker, TrackerKind};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::{HostBacking, HostDirtyTracker, HostMemory, HostMethod, HostRegion, HostTrackerConfig};

#[derive(Debug, Default)]
struct State {
    iteration: u64,
    running: bool,
    quit: bool,
    /// Writers parked (between iterations).
    parked: u32,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    /// Mirrors `State::running` for the writers' hot loop; cleared before `stop` waits.
    running: AtomicBool,
    writes: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A writer never panics while holding the lock; recover the state if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// Host memory of `SelftestConfig::pages` pages, a tracker over it, and writer threads.
pub struct HostSelftest {
    mem: Arc<HostMemory>,
    tracker: HostDirtyTracker,
    mode: TrackerKind,
    backing: HostBacking,
    writers: u32,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    snapshot: Vec<u64>,
}

impl HostSelftest {
    /// Map the memory, start tracking it with `method` in `cfg.tracker`'s mode, and start
    /// `cfg.vcpus` writer threads (parked until `resume`).
    pub fn new(
        cfg: &SelftestConfig,
        method: HostMethod,
        backing: HostBacking,
    ) -> Result<Self, BackendError> {
        if let TrackerKind::Ring { .. } = cfg.tracker {
            return Err(
                "a dirty ring has no meaning for host memory (there are no vCPUs to \
                        queue writes per thread): use dirty-log or clear-log"
                    .into(),
            );
        }
        if cfg.vcpus == 0 {
            return Err("at least one writer thread is needed (--vcpus)".into());
        }
        let len = cfg
            .pages
            .checked_mul(backing.page_size())
            .ok_or("--pages times the page size overflows")?;
        let mem = Arc::new(HostMemory::new(len, backing)?);
        let tracker = HostDirtyTracker::new(
            vec![HostRegion::new(mem.clone())],
            HostTrackerConfig {
                method,
                mode: cfg.tracker,
            },
        )?;
        tracker.start()?;
        let shared = Arc::new(Shared::default());
        let words_per_page = mem.page_size() / 8;
        let mut threads = Vec::new();
        for i in 0..cfg.vcpus {
            let (sh, m) = (shared.clone(), mem.clone());
            let seed = cfg.seed.wrapping_add(u64::from(i) + 1);
            let npages = cfg.pages;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("host-writer-{i}"))
                    .spawn(move || writer(&m, &sh, npages, words_per_page, seed))?,
            );
        }
        let mut me = HostSelftest {
            snapshot: vec![0; cfg.pages.div_ceil(64) as usize],
            mem,
            tracker,
            mode: cfg.tracker,
            backing,
            writers: cfg.vcpus,
            shared,
            threads,
        };
        me.wait_parked();
        Ok(me)
    }

    fn wait_parked(&mut self) {
        let mut st = self.shared.lock();
        while st.parked < self.writers {
            st = self.shared.wait(st);
        }
    }
}

/// Stamp `iteration` into random pages while running; park in between.
fn writer(mem: &HostMemory, sh: &Shared, npages: u64, words_per_page: u64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let words = mem.words();
    let mut st = sh.lock();
    st.parked += 1;
    sh.cv.notify_all();
    loop {
        while !st.running && !st.quit {
            st = sh.wait(st);
        }
        if st.quit {
            return;
        }
        st.parked -= 1;
        let iteration = st.iteration;
        drop(st);
        while sh.running.load(Ordering::SeqCst) {
            let page = rng.random_range(0..npages);
            words[(page * words_per_page) as usize].store(iteration, Ordering::Relaxed);
            sh.writes.fetch_add(1, Ordering::Relaxed);
        }
        // The last write is done before `parked` counts this writer (the lock orders it
        // before `stop` returns and the checker reads the page).
        st = sh.lock();
        st.parked += 1;
        sh.cv.notify_all();
    }
}

impl SelftestBackend for HostSelftest {
    fn describe(&self) -> String {
        format!(
            "host memory ({} method, {} backing), {} writer threads, {} pages of {} KiB",
            self.tracker.method(),
            self.backing,
            self.writers,
            self.mem.npages(),
            self.mem.page_size() / 1024
        )
    }

    fn npages(&self) -> u64 {
        self.mem.npages()
    }

    fn resume(&mut self, iteration: u64) -> Result<(), BackendError> {
        self.shared.writes.store(0, Ordering::Relaxed);
        let mut st = self.shared.lock();
        st.iteration = iteration;
        st.running = true;
        self.shared.running.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    fn ring_full_exits(&self) -> u64 {
        0
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        {
            let mut st = self.shared.lock();
            st.running = false;
            self.shared.running.store(false, Ordering::SeqCst);
        }
        self.wait_parked();
        Ok(())
    }

    fn collect(&mut self, bitmap: &mut [u64]) -> Result<Collected, BackendError> {
        let count = match self.mode {
            TrackerKind::ClearLog => {
                self.snapshot.fill(0);
                self.tracker.harvest(0, &mut self.snapshot)?;
                self.tracker.clear(0, 0, &self.snapshot)?;
                for (o, s) in bitmap.iter_mut().zip(&self.snapshot) {
                    *o |= s;
                }
                self.snapshot
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum()
            }
            _ => {
                let before: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
                self.tracker.harvest(0, bitmap)?;
                bitmap
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum::<u64>()
                    - before
            }
        };
        Ok(Collected {
            last_ring_pages: Vec::new(),
            count,
        })
    }

    fn read_page(&self, page: u64) -> u64 {
        let words_per_page = self.mem.page_size() / 8;
        self.mem.words()[(page * words_per_page) as usize].load(Ordering::Relaxed)
    }
}

impl Drop for HostSelftest {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.quit = true;
            st.running = false;
            self.shared.running.store(false, Ordering::SeqCst);
        }
        self.shared.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = self.tracker.stop();
    }
}
