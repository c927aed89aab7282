//! [`SoftVm`]: a VM in software, for tests and benchmarks of the engines without `/dev/kvm`.
//!
//! - **Memory**: one private anonymous mapping per region (zero-filled, page-aligned), accessed only through 64-bit atomics
//!   (so the engine's concurrent reads are well defined).
//! - **vCPUs**: threads that each write one word into a page of a working set, in order or at
//!   random, at a tunable rate (or flat out), and count their writes: the guest's progress.
//!   They stop on [`pause`](Vcpus::pause), and [`throttle`](Vcpus::throttle) holds them out
//!   for that share of every 10 ms.
//! - **Tracker**: it models KVM's three ([`TrackerKind`]): the legacy get-and-clear bitmap,
//!   manual protect (GET snapshot, per-chunk CLEAR) and the dirty ring (per-vCPU rings of first
//!   writes to write-protected pages, a full ring stalls the vCPU until harvest, harvest
//!   resets).
//! - **VMM writes**: an optional device thread writes pages behind the tracker's back and
//!   records them only in its VMM bitmap (a `DirtyBitmap`), as a VMM's device models do.
//! - **vCPU state**: each thread's counter, random state, position and workload, so that the
//!   target continues the same workload where the source stopped.
//! - **Devices**: named, versioned byte strings ([`SoftVm::add_device`]) that a source sends
//!   and a target, which must know each name and version, restores.
//!
//! `SoftVm` implements every part of [`MigrationSource`] and [`MigrationTarget`] itself.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use dirtylog::sync::lock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirtylog::{DirtyBitmap, DirtyTracker, TrackerError, TrackerKind};
use dirtylog_host::{HostBacking, HostMemory};

use crate::device::{DeviceSection, DeviceState};
use crate::error::VmError;
use crate::memory::{MigrationMemory, RegionMemory};
use crate::vcpu::{VcpuRestore, Vcpus};
use crate::vm::{MigrationSource, MigrationTarget};
use crate::wire::{Region, StreamHeader};

/// What the vCPUs (and the device) do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// First page of the working set, counted over all regions in layout order.
    pub first_page: u64,
    /// Pages in the working set; 0 for an idle guest.
    pub pages: u64,
    /// Page writes per second per vCPU; `None` for as fast as it goes.
    pub rate: Option<u64>,
    /// Random pages of the working set rather than a sweep.
    pub random: bool,
    /// Page writes per second by the VMM's device thread, tracked only in the VMM bitmap;
    /// `None` for no device.
    pub vmm_rate: Option<u64>,
}

impl Workload {
    /// No writes at all.
    pub fn idle() -> Self {
        Workload {
            first_page: 0,
            pages: 0,
            rate: None,
            random: false,
            vmm_rate: None,
        }
    }
}

/// A software VM to build.
#[derive(Clone, Debug)]
pub struct SoftConfig {
    /// Page size, a power of two ≥ 4096.
    pub page_size: u32,
    /// The memory map.
    pub regions: Vec<Region>,
    /// vCPU threads.
    pub vcpus: u32,
    /// The dirty tracker modelled.
    pub tracker: TrackerKind,
    /// What the vCPUs do.
    pub workload: Workload,
    /// Percentage of pages given non-zero content at creation (the rest stay zero).
    pub nonzero_percent: u8,
}

/// Guest memory of one region: a private anonymous mapping of atomic words (dirtylog-host's
/// [`HostMemory`]), like a VMM's guest RAM: page-aligned, zero-filled lazily (untouched memory
/// costs no RSS), and so [`MigrationMemory::unpopulated_is_zero`].
struct Memory(HostMemory);

impl Memory {
    fn new(bytes: u64) -> Result<Self, VmError> {
        HostMemory::new(bytes, HostBacking::Anonymous)
            .map(Memory)
            .map_err(|e| format!("guest memory of {bytes} bytes: {e}").into())
    }

    fn words(&self) -> &[AtomicU64] {
        self.0.words()
    }

    fn region(&self) -> RegionMemory {
        // SAFETY: the mapping is `len` bytes, page-aligned, and lives as long as the `SoftVm`
        // (which outlives any migration that borrows it); the threads that write it use
        // atomics, and pause and resume follow the memory contract.
        unsafe { RegionMemory::new(self.0.as_ptr(), self.0.len() as usize) }
    }
}

/// The dirty ring of one vCPU.
struct Ring {
    /// Global page numbers logged since the last harvest.
    entries: Vec<u64>,
}

/// Everything the threads share.
struct Inner {
    page_size: u64,
    regions: Vec<Region>,
    /// First global page of each region, and one past the last.
    starts: Vec<u64>,
    memory: Vec<Memory>,
    tracker: TrackerKind,
    tracking: AtomicBool,
    /// `DirtyLog`/`ClearLog`: the log. `Ring`: pages harvested from the rings, per region.
    logs: Vec<DirtyBitmap>,
    /// `Ring`: write-protection, one bit per page set while the page is writable.
    writable: Vec<DirtyBitmap>,
    rings: Vec<Mutex<Ring>>,
    vmm: Vec<DirtyBitmap>,
    /// Writes per vCPU, restored from the source on a target.
    progress: Vec<AtomicU64>,
    /// Each running vCPU's state as of its last batch.
    live: Vec<Mutex<Option<VcpuState>>>,
    vmm_writes: AtomicU64,
    throttle: AtomicU8,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    parked: AtomicUsize,
    stop: AtomicBool,
    resumes: AtomicUsize,
}

struct Gate {
    paused: bool,
}

/// A software VM: see the [module docs](self).
pub struct SoftVm {
    inner: Arc<Inner>,
    vcpus: u32,
    states: Mutex<Vec<Option<VcpuState>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Tests: keep a copy of the memory as it was when the target was resumed.
    keep_resume_image: std::sync::atomic::AtomicBool,
    resume_image: Mutex<Option<Vec<Vec<u8>>>>,
    /// The devices: sent by a source; known to, and restored into, a target.
    devices: Mutex<Vec<DeviceSection>>,
    /// Target: the device sections restored, in arrival order.
    restored_devices: Mutex<Vec<String>>,
    /// Tests: how long `pause` and `save_state` take at least, as a VM with slow vCPU kicks
    /// or large device states would.
    slow: Mutex<(Duration, Duration)>,
}

/// The state of one vCPU thread, as migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VcpuState {
    counter: u64,
    rng: u64,
    position: u64,
    workload: Workload,
}

const STATE_MAGIC: u64 = 0x5346_5456_4350_5531; // "SFTVCPU1"
const STATE_WORDS: usize = 9;

impl VcpuState {
    fn encode(&self) -> Vec<u8> {
        let w = &self.workload;
        let words: [u64; STATE_WORDS] = [
            STATE_MAGIC,
            self.counter,
            self.rng,
            self.position,
            w.first_page,
            w.pages,
            w.rate.map_or(u64::MAX, |r| r),
            u64::from(w.random),
            w.vmm_rate.map_or(u64::MAX, |r| r),
        ];
        words.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn decode(blob: &[u8]) -> Result<Self, VmError> {
        if blob.len() != STATE_WORDS * 8 {
            return Err(format!(
                "vCPU state of {} bytes, expected {}",
                blob.len(),
                STATE_WORDS * 8
            )
            .into());
        }
        let mut words = [0u64; STATE_WORDS];
        for (w, chunk) in words.iter_mut().zip(blob.chunks_exact(8)) {
            let mut b = [0; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        if words[0] != STATE_MAGIC {
            return Err("not a software vCPU state".into());
        }
        let opt = |v: u64| (v != u64::MAX).then_some(v);
        Ok(VcpuState {
            counter: words[1],
            rng: words[2],
            position: words[3],
            workload: Workload {
                first_page: words[4],
                pages: words[5],
                rate: opt(words[6]),
                random: words[7] != 0,
                vmm_rate: opt(words[8]),
            },
        })
    }
}

impl SoftVm {
    /// A running source VM.
    pub fn source(config: &SoftConfig) -> Result<Self, VmError> {
        let vm = SoftVm::build(
            config.page_size,
            config.regions.clone(),
            config.vcpus,
            config.tracker,
            config.workload,
        )?;
        vm.fill(config.nonzero_percent);
        let states = (0..config.vcpus)
            .map(|i| VcpuState {
                counter: 0,
                rng: splitmix(0x1234_5678 + u64::from(i)) | 1,
                position: u64::from(i) * 7919,
                workload: config.workload,
            })
            .collect();
        vm.start(states);
        Ok(vm)
    }

    /// An empty target VM with `header`'s layout: zero memory, vCPUs waiting for their state
    /// and for [`resume`](VcpuRestore::resume).
    pub fn target(header: &StreamHeader, tracker: TrackerKind) -> Result<Self, VmError> {
        SoftVm::build(
            header.page_size(),
            header.regions().to_vec(),
            header.vcpu_count(),
            tracker,
            Workload::idle(),
        )
    }

    fn build(
        page_size: u32,
        regions: Vec<Region>,
        vcpus: u32,
        tracker: TrackerKind,
        workload: Workload,
    ) -> Result<Self, VmError> {
        // Validates the layout the same way a stream header would.
        let header = StreamHeader::new(page_size, vcpus, regions)?;
        let page = u64::from(page_size);
        let regions = header.regions().to_vec();
        let mut starts = vec![0];
        for r in &regions {
            starts.push(starts[starts.len() - 1] + r.size / page);
        }
        let total = starts[starts.len() - 1];
        if workload.pages > 0 && workload.first_page.saturating_add(workload.pages) > total {
            return Err(format!(
                "working set {}..{} is past the guest's {total} pages",
                workload.first_page,
                workload.first_page + workload.pages
            )
            .into());
        }
        let npages = |r: &Region| r.size / page;
        let inner = Inner {
            page_size: page,
            memory: regions
                .iter()
                .map(|r| Memory::new(r.size))
                .collect::<Result<_, _>>()?,
            logs: regions
                .iter()
                .map(|r| DirtyBitmap::new(npages(r)))
                .collect(),
            writable: match tracker {
                TrackerKind::Ring { .. } => regions
                    .iter()
                    .map(|r| DirtyBitmap::new(npages(r)))
                    .collect(),
                _ => Vec::new(),
            },
            rings: (0..vcpus)
                .map(|_| {
                    Mutex::new(Ring {
                        entries: Vec::new(),
                    })
                })
                .collect(),
            vmm: regions
                .iter()
                .map(|r| DirtyBitmap::new(npages(r)))
                .collect(),
            progress: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            live: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            vmm_writes: AtomicU64::new(0),
            regions,
            starts,
            tracker,
            tracking: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            gate: Mutex::new(Gate { paused: false }),
            gate_cv: Condvar::new(),
            parked: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            resumes: AtomicUsize::new(0),
        };
        Ok(SoftVm {
            inner: Arc::new(inner),
            vcpus,
            states: Mutex::new(vec![None; vcpus as usize]),
            threads: Mutex::new(Vec::new()),
            keep_resume_image: AtomicBool::new(false),
            resume_image: Mutex::new(None),
            devices: Mutex::new(Vec::new()),
            restored_devices: Mutex::new(Vec::new()),
            slow: Mutex::new((Duration::ZERO, Duration::ZERO)),
        })
    }

    /// The saved state of an idle vCPU that has done nothing yet, in this VM's format: what a
    /// source without software vCPUs sends to a software target.
    pub fn idle_vcpu_state() -> Vec<u8> {
        VcpuState {
            counter: 0,
            rng: 1,
            position: 0,
            workload: Workload::idle(),
        }
        .encode()
    }

    /// Add a device. On a source, its section is sent at switchover. On a target, it declares
    /// a device the VM knows, by name and version: a section of that name and version replaces
    /// its bytes; any other section fails the migration. Replaces a device of the same name.
    pub fn add_device(&self, section: DeviceSection) {
        let mut devices = lock(&self.devices);
        devices.retain(|d| d.name() != section.name());
        devices.push(section);
    }

    /// The devices, with the state restored into them on a target.
    pub fn device_sections(&self) -> Vec<DeviceSection> {
        lock(&self.devices).clone()
    }

    /// Target: the names of the device sections restored, in arrival order.
    pub fn restored_devices(&self) -> Vec<String> {
        lock(&self.restored_devices).clone()
    }

    /// Give `percent`% of the pages non-zero content (a few words each).
    fn fill(&self, percent: u8) {
        let inner = &self.inner;
        let words_per_page = (inner.page_size / 8) as usize;
        for (r, mem) in inner.memory.iter().enumerate() {
            let words = mem.words();
            for (p, page) in words.chunks(words_per_page).enumerate() {
                let id = inner.starts[r] + p as u64;
                if splitmix(id) % 100 < u64::from(percent) {
                    for (k, w) in page.iter().step_by(64).enumerate() {
                        w.store(splitmix(id * 64 + k as u64) | 1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    fn start(&self, states: Vec<VcpuState>) {
        let mut threads = lock(&self.threads);
        let vmm_rate = states.first().and_then(|s| s.workload.vmm_rate);
        let device = states.first().map(|s| s.workload);
        for (i, state) in states.into_iter().enumerate() {
            self.inner.progress[i].store(state.counter, Ordering::Relaxed);
            *lock(&self.inner.live[i]) = Some(state);
            let inner = self.inner.clone();
            threads.push(std::thread::spawn(move || vcpu_thread(&inner, i, state)));
        }
        if let (Some(rate), Some(ws)) = (vmm_rate, device) {
            let inner = self.inner.clone();
            threads.push(std::thread::spawn(move || device_thread(&inner, rate, ws)));
        }
    }

    /// Threads that take part in pause.
    fn thread_count(&self) -> usize {
        lock(&self.threads).len()
    }

    /// A copy of region `index`'s bytes (word-atomic, so consistent only while paused).
    pub fn snapshot(&self, index: usize) -> Vec<u8> {
        let words = self.inner.memory[index].words();
        let mut bytes = Vec::with_capacity(words.len() * 8);
        for w in words {
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        bytes
    }

    /// For tests: on [`VcpuRestore::resume`], copy the whole memory first (it costs a
    /// full copy, and so downtime), so that it can be compared with the source's after the
    /// target guest has moved on.
    pub fn keep_resume_image(&self) {
        self.keep_resume_image.store(true, Ordering::Relaxed);
    }

    /// The copy kept by [`keep_resume_image`](Self::keep_resume_image), region by region.
    pub fn resume_image(&self) -> Option<Vec<Vec<u8>>> {
        lock(&self.resume_image).clone()
    }

    /// For tests: write `value` into global page `page` behind every tracker's back, as a
    /// buggy DMA would. The migration cannot see it; the memory hash must.
    pub fn write_untracked(&self, page: u64, value: u64) {
        let (r, p) = self.inner.locate(page);
        let words_per_page = self.inner.page_size / 8;
        self.inner.memory[r].words()[(p * words_per_page) as usize].store(value, Ordering::Relaxed);
    }

    /// Whether the vCPUs are stopped (paused, or a target not resumed yet).
    pub fn is_paused(&self) -> bool {
        lock(&self.inner.gate).paused || self.thread_count() == 0
    }

    /// How many times [`VcpuRestore::resume`] or [`Vcpus::resume`] ran.
    pub fn resume_count(&self) -> usize {
        self.inner.resumes.load(Ordering::Relaxed)
    }

    /// Tests: make every `pause` take at least `pause` and every `save_state` at least
    /// `save`, so that the blackout's fixed costs are known.
    pub fn set_slow_switchover(&self, pause: Duration, save: Duration) {
        *lock(&self.slow) = (pause, save);
    }

    /// Tests: a handle that outlives the VM and tells whether it was ever resumed and whether
    /// it has been stopped (dropped) since.
    pub fn watch(&self) -> Watch {
        Watch(self.inner.clone())
    }

    /// Writes made by the VMM's device thread.
    pub fn vmm_writes(&self) -> u64 {
        self.inner.vmm_writes.load(Ordering::Relaxed)
    }

    /// The current throttle percentage.
    pub fn throttle_percent(&self) -> u8 {
        self.inner.throttle.load(Ordering::Relaxed)
    }

    /// Stop and join every thread.
    fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Release);
        {
            let mut g = lock(&self.inner.gate);
            g.paused = false;
        }
        self.inner.gate_cv.notify_all();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }

    fn do_pause(&self) -> Result<(), VmError> {
        lock(&self.inner.gate).paused = true;
        let want = self.thread_count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inner.parked.load(Ordering::Acquire) < want {
            if Instant::now() > deadline {
                return Err("vCPUs did not stop within 10 s".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn do_resume(&self) {
        self.inner.resumes.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.gate).paused = false;
        self.inner.gate_cv.notify_all();
    }
}

/// See [`SoftVm::watch`].
#[derive(Clone)]
pub struct Watch(Arc<Inner>);

impl Watch {
    /// Times the VM's vCPUs were resumed.
    pub fn resume_count(&self) -> usize {
        self.0.resumes.load(Ordering::Relaxed)
    }

    /// The VM has been stopped for good (shut down or dropped).
    pub fn stopped(&self) -> bool {
        self.0.stop.load(Ordering::Acquire)
    }

    /// The VM was resumed and has not been stopped since: its guest runs.
    pub fn running(&self) -> bool {
        self.resume_count() > 0 && !self.stopped()
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("resumes", &self.resume_count())
            .field("stopped", &self.stopped())
            .finish()
    }
}

impl std::fmt::Debug for SoftVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftVm")
            .field("regions", &self.inner.regions)
            .field("vcpus", &self.vcpus)
            .field("tracker", &self.inner.tracker)
            .finish_non_exhaustive()
    }
}

impl Drop for SoftVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    /// Region and page of global page `g`.
    fn locate(&self, g: u64) -> (usize, u64) {
        let r = self.starts.partition_point(|&s| s <= g) - 1;
        (r, g - self.starts[r])
    }

    /// Stop here while paused; count as parked. Returns false when the VM stops.
    fn gate(&self) -> bool {
        let mut g = lock(&self.gate);
        if g.paused {
            self.parked.fetch_add(1, Ordering::AcqRel);
            while g.paused && !self.stop.load(Ordering::Acquire) {
                g = dirtylog::sync::wait(&self.gate_cv, g);
            }
            self.parked.fetch_sub(1, Ordering::AcqRel);
        }
        !self.stop.load(Ordering::Acquire)
    }

    fn paused(&self) -> bool {
        lock(&self.gate).paused
    }

    /// One guest write: log it the way the tracker would, and store `value` into page `g`.
    fn guest_write(&self, vcpu: usize, g: u64, value: u64) -> bool {
        let (r, page) = self.locate(g);
        let words_per_page = self.page_size / 8;
        let word = (page * words_per_page + value % words_per_page) as usize;
        let target = &self.memory[r].words()[word];
        match self.tracker {
            TrackerKind::Ring { entries } if self.tracking.load(Ordering::Acquire) => {
                let capacity = entries as usize;
                // The ring lock covers protection check, logging and the write itself, as the
                // fault handler and the store are one step for a vCPU under KVM.
                let mut ring = loop {
                    let ring = lock(&self.rings[vcpu]);
                    if ring.entries.len() < capacity {
                        break ring;
                    }
                    // KVM_EXIT_DIRTY_RING_FULL: wait for the harvest.
                    drop(ring);
                    if self.paused() || self.stop.load(Ordering::Acquire) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                };
                let bit = 1u64 << (page % 64);
                if self.writable[r].set_word_bits((page / 64) as usize, bit) == 0 {
                    ring.entries.push(g);
                }
                target.store(value, Ordering::Relaxed);
            }
            TrackerKind::Ring { .. } => target.store(value, Ordering::Relaxed),
            _ => {
                target.store(value, Ordering::Relaxed);
                if self.tracking.load(Ordering::Acquire) {
                    self.logs[r].set(page);
                }
            }
        }
        true
    }
}

fn vcpu_thread(inner: &Inner, i: usize, mut s: VcpuState) {
    const BATCH: u64 = 64;
    const PERIOD: Duration = Duration::from_millis(10);
    let mut period_start = Instant::now();
    let mut rate_start = Instant::now();
    let mut rate_base = s.counter;
    loop {
        if inner.paused() || inner.stop.load(Ordering::Acquire) {
            if !inner.gate() {
                return;
            }
            // Pacing starts over after a pause.
            rate_start = Instant::now();
            rate_base = s.counter;
            period_start = rate_start;
        }
        if s.workload.pages == 0 {
            // An idle guest still makes progress: it ticks.
            std::thread::sleep(Duration::from_millis(1));
            s.counter += 1;
            inner.progress[i].store(s.counter, Ordering::Relaxed);
            *lock(&inner.live[i]) = Some(s);
            continue;
        }
        let throttle = inner.throttle.load(Ordering::Relaxed);
        if throttle > 0 {
            let run = PERIOD.mul_f64(f64::from(100 - throttle.min(100)) / 100.0);
            let now = Instant::now();
            if now - period_start >= run {
                std::thread::sleep(PERIOD.saturating_sub(run));
                period_start = Instant::now();
                // Time held out is lost, not owed: the pacing must not catch up on it.
                rate_start = period_start;
                rate_base = s.counter;
            }
        } else {
            period_start = Instant::now();
        }
        if let Some(rate) = s.workload.rate {
            let allowed = (rate_start.elapsed().as_secs_f64() * rate as f64) as u64;
            if s.counter - rate_base >= allowed {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
        }
        for _ in 0..BATCH {
            let offset = if s.workload.random {
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                s.rng % s.workload.pages
            } else {
                s.position = (s.position + 1) % s.workload.pages;
                s.position
            };
            let value = splitmix(s.counter ^ s.rng) | 1;
            if !inner.guest_write(i, s.workload.first_page + offset, value) {
                break;
            }
            s.counter += 1;
        }
        inner.progress[i].store(s.counter, Ordering::Relaxed);
        // Publish the state for save_vcpu_state, which reads it once every vCPU is parked
        // (parking comes after this store).
        *lock(&inner.live[i]) = Some(s);
    }
}

/// The device thread: writes pages the tracker never sees, marking the VMM bitmap after each.
fn device_thread(inner: &Inner, rate: u64, ws: Workload) {
    let mut n = 0u64;
    let start = Instant::now();
    let total = *inner.starts.last().unwrap_or(&0);
    loop {
        if (inner.paused() || inner.stop.load(Ordering::Acquire)) && !inner.gate() {
            return;
        }
        let allowed = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if n >= allowed || total == 0 {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        // Pages outside the vCPUs' working set where possible, so that only the VMM bitmap
        // can bring them across.
        let g = (splitmix(n) % total + ws.first_page + ws.pages) % total;
        let (r, page) = inner.locate(g);
        let value = splitmix(n ^ 0xdead_beef) | 1;
        let words_per_page = inner.page_size / 8;
        let word = (page * words_per_page + n % words_per_page) as usize;
        inner.memory[r].words()[word].store(value, Ordering::Relaxed);
        inner.vmm[r].set(page);
        n += 1;
        inner.vmm_writes.store(n, Ordering::Relaxed);
    }
}

impl MigrationSource for SoftVm {
    type Memory = Self;
    type Tracker = Self;
    type Vcpus = Self;

    fn memory(&self) -> &Self {
        self
    }

    fn tracker(&self) -> &Self {
        self
    }

    fn vcpus(&self) -> &Self {
        self
    }

    fn devices(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn guest_progress(&self) -> u64 {
        self.progress_sum()
    }
}

impl MigrationTarget for SoftVm {
    type Memory = Self;
    type Vcpus = Self;

    fn memory(&self) -> &Self {
        self
    }

    fn vcpus(&self) -> &Self {
        self
    }

    fn devices(&self) -> Option<&dyn DeviceState> {
        Some(self)
    }

    fn guest_progress(&self) -> u64 {
        self.progress_sum()
    }
}

impl SoftVm {
    fn progress_sum(&self) -> u64 {
        self.inner
            .progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }
}

impl MigrationMemory for SoftVm {
    fn page_size(&self) -> u32 {
        self.inner.page_size as u32
    }

    fn regions(&self) -> Vec<Region> {
        self.inner.regions.clone()
    }

    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        self.inner.memory.get(index).map(Memory::region)
    }

    fn vmm_bitmap(&self, index: usize) -> Option<&DirtyBitmap> {
        self.inner.vmm.get(index)
    }

    fn unpopulated_is_zero(&self, _index: usize) -> bool {
        true
    }
}

impl DirtyTracker for SoftVm {
    fn kind(&self) -> TrackerKind {
        self.inner.tracker
    }

    fn start(&self) -> Result<(), TrackerError> {
        let inner = &self.inner;
        if inner.tracking.swap(true, Ordering::AcqRel) {
            return Err("dirty tracking is already on".into());
        }
        Ok(())
    }

    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), TrackerError> {
        let inner = &self.inner;
        let log = inner
            .logs
            .get(index)
            .ok_or_else(|| format!("no region {index}"))?;
        if out.len() != log.words() {
            return Err(
                format!("harvest buffer of {} words for {}", out.len(), log.words()).into(),
            );
        }
        match inner.tracker {
            TrackerKind::DirtyLog => log.take_or_into(out),
            TrackerKind::ClearLog => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o |= log.load_word(i);
                }
            }
            TrackerKind::Ring { .. } => {
                // Reap every ring into the per-region logs, then reset: re-protect what was
                // reaped. Only then are the pages handed out as clean.
                for ring in &inner.rings {
                    let mut ring = lock(ring);
                    for g in ring.entries.drain(..) {
                        let (r, page) = inner.locate(g);
                        inner.logs[r].set(page);
                        let bit = 1u64 << (page % 64);
                        inner.writable[r].clear_word_bits((page / 64) as usize, bit);
                    }
                }
                log.take_or_into(out);
            }
        }
        Ok(())
    }

    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), TrackerError> {
        if !self.inner.tracker.manual_protect() {
            return Ok(());
        }
        if first_page % 64 != 0 {
            return Err(format!("clear at page {first_page}, not a multiple of 64").into());
        }
        let log = self
            .inner
            .logs
            .get(index)
            .ok_or_else(|| format!("no region {index}"))?;
        let first = (first_page / 64) as usize;
        if first + bits.len() > log.words() {
            return Err("clear past the end of the slot".into());
        }
        for (i, &mask) in bits.iter().enumerate() {
            if mask != 0 {
                log.clear_word_bits(first + i, mask);
            }
        }
        Ok(())
    }

    fn stop(&self) -> Result<(), TrackerError> {
        self.inner.tracking.store(false, Ordering::Release);
        for ring in &self.inner.rings {
            lock(ring).entries.clear();
        }
        Ok(())
    }
}

impl Vcpus for SoftVm {
    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }

    fn pause(&self) -> Result<(), VmError> {
        let delay = lock(&self.slow).0;
        let start = Instant::now();
        self.do_pause()?;
        std::thread::sleep(delay.saturating_sub(start.elapsed()));
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.do_resume();
        Ok(())
    }

    fn throttle(&self, percent: u8) -> Result<(), VmError> {
        if percent > 99 {
            return Err(format!("throttle of {percent}%").into());
        }
        self.inner.throttle.store(percent, Ordering::Relaxed);
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        if !lock(&self.inner.gate).paused {
            return Err("save_state while the vCPUs run".into());
        }
        std::thread::sleep(lock(&self.slow).1);
        self.inner
            .live
            .iter()
            .enumerate()
            .map(|(i, s)| match *lock(s) {
                Some(state) => Ok(state.encode()),
                None => Err(format!("vCPU {i} has no state").into()),
            })
            .collect()
    }
}

impl VcpuRestore for SoftVm {
    fn restore_state(&self, vcpu: u32, blob: &[u8]) -> Result<(), VmError> {
        let state = VcpuState::decode(blob)?;
        let mut states = lock(&self.states);
        let Some(slot) = states.get_mut(vcpu as usize) else {
            return Err(format!("no vCPU {vcpu}").into());
        };
        self.inner.progress[vcpu as usize].store(state.counter, Ordering::Relaxed);
        *slot = Some(state);
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        let states: Vec<VcpuState> = lock(&self.states).iter().flatten().copied().collect();
        if states.len() != self.vcpus as usize {
            return Err("resume before every vCPU state was restored".into());
        }
        if self.keep_resume_image.load(Ordering::Relaxed) {
            let image = (0..self.inner.memory.len())
                .map(|i| self.snapshot(i))
                .collect();
            *lock(&self.resume_image) = Some(image);
        }
        self.inner.resumes.fetch_add(1, Ordering::Relaxed);
        self.start(states);
        Ok(())
    }
}

impl DeviceState for SoftVm {
    fn save_devices(&self) -> Result<Vec<DeviceSection>, VmError> {
        Ok(self.device_sections())
    }

    fn restore_device(&self, name: &str, version: u32, bytes: &[u8]) -> Result<(), VmError> {
        let mut devices = lock(&self.devices);
        let Some(d) = devices.iter_mut().find(|d| d.name() == name) else {
            return Err(format!("this VM has no device named {name:?}").into());
        };
        if d.version() != version {
            return Err(format!(
                "device {name:?} reads state version {}, not {version}",
                d.version()
            )
            .into());
        }
        *d = DeviceSection::new(name, version, bytes.to_vec())?;
        lock(&self.restored_devices).push(name.to_string());
        Ok(())
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
