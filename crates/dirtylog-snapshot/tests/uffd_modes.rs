//! Background snapshots and lazy restore (the userfaultfd modes) under concurrent guest
//! writes, on a small software VM whose memory is page-aligned anonymous `mmap`s (userfaultfd
//! needs whole host pages; `SoftVm`'s heap allocations are not page-aligned).
//!
//! - Background: "vCPU" threads rewrite random words of random pages flat out during each
//!   member's background save; every member (full, then diffs) must equal a copy of memory
//!   taken while the guest was paused for it.
//! - Lazy: the target's threads read and write random pages from the moment it is resumed,
//!   while the prefetcher runs; every read sees the chain's contents (or the thread's own
//!   writes), and the final memory equals the chain's with those writes applied.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use dirtylog::{DirtyBitmap, DirtyTracker, TrackerError, TrackerKind};
use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::{
    MigrationMemory, MigrationSource, MigrationTarget, RegionMemory, VcpuRestore, Vcpus, VmError,
};
use dirtylog_snapshot::{
    restore, Chain, CreateConfig, RestoreOptions, SnapshotError, SnapshotMode, Snapshotter,
};

const PAGE: u64 = 4096;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One anonymous mapping, unmapped on drop; accessed only through atomics.
struct Mem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by the value, accessed only through atomics.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(len: usize) -> Mem {
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes");
        Mem { ptr: p.cast(), len }
    }

    fn word(&self, off: u64) -> &AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= self.len as u64);
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); every access to this
        // memory is a 64-bit atomic.
        unsafe { AtomicU64::from_ptr(self.ptr.add(off as usize).cast()) }
    }

    fn page(&self, p: u64) -> Vec<u8> {
        (0..PAGE / 8)
            .flat_map(|w| {
                self.word(p * PAGE + w * 8)
                    .load(Ordering::Relaxed)
                    .to_ne_bytes()
            })
            .collect()
    }

    fn copy(&self) -> Vec<u8> {
        (0..self.len as u64 / PAGE)
            .flat_map(|p| self.page(p))
            .collect()
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[derive(Default)]
struct Gate {
    paused: bool,
    parked: usize,
    stop: bool,
}

/// What the VM and its threads share.
struct Shared {
    regions: Vec<Region>,
    mems: Vec<Mem>,
    dirty: Vec<DirtyBitmap>,
    tracking: AtomicBool,
    pause_req: AtomicBool,
    gate: Mutex<Gate>,
    cv: Condvar,
    ops: AtomicU64,
    /// Target: the chain's contents, region by region (what reads must see).
    expected: Option<Arc<Vec<Vec<u8>>>>,
    /// Target: reads that saw something else.
    bad_reads: AtomicU64,
}

impl Shared {
    /// Park while paused; false when told to stop.
    fn checkpoint(&self) -> bool {
        if !self.pause_req.load(Ordering::Acquire) {
            return true;
        }
        let mut g = self.gate.lock().unwrap();
        while g.paused && !g.stop {
            g.parked += 1;
            self.cv.notify_all();
            g = self.cv.wait(g).unwrap();
            g.parked -= 1;
        }
        !g.stop
    }

    fn stopped(&self) -> bool {
        self.gate.lock().unwrap().stop
    }

    /// Global page `g` as (region, page).
    fn locate(&self, mut g: u64) -> (usize, u64) {
        for (r, reg) in self.regions.iter().enumerate() {
            let n = reg.size / PAGE;
            if g < n {
                return (r, g);
            }
            g -= n;
        }
        unreachable!("page out of range")
    }

    fn npages(&self) -> u64 {
        self.regions.iter().map(|r| r.size / PAGE).sum()
    }
}

/// A source vCPU: rewrite random words of random pages of the working set (every fourth
/// page), marking them dirty.
fn source_vcpu(sh: &Shared, seed: u64) {
    let mut rng = seed;
    let n = sh.npages() / 4;
    while sh.checkpoint() {
        if sh.gate.lock().unwrap().stop {
            return;
        }
        for _ in 0..64 {
            rng = splitmix(rng);
            let (r, p) = sh.locate(rng % n * 4);
            let w = (rng >> 40) % (PAGE / 8);
            sh.mems[r]
                .word(p * PAGE + w * 8)
                .store(rng | 1, Ordering::Relaxed);
            if sh.tracking.load(Ordering::Relaxed) {
                sh.dirty[r].set(p);
            }
            sh.ops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A target vCPU: read or write random pages of its own share (global page % vcpus == id);
/// every read must see the chain's contents with this thread's own writes. Returns its writes
/// (global page → the value of the page's first word).
fn target_vcpu(sh: &Shared, id: u64, vcpus: u64, seed: u64) -> Vec<(u64, u64)> {
    let expected = sh
        .expected
        .as_ref()
        .expect("a target has the expected image");
    let mut mine: std::collections::HashMap<u64, u64> = Default::default();
    let mut rng = seed;
    let n = sh.npages() / vcpus;
    while sh.checkpoint() && !sh.stopped() {
        rng = splitmix(rng);
        let g = (rng % n) * vcpus + id;
        let (r, p) = sh.locate(g);
        if rng & (1 << 62) != 0 {
            let got = sh.mems[r].page(p);
            let off = (p * PAGE) as usize;
            let mut want = expected[r][off..off + PAGE as usize].to_vec();
            if let Some(v) = mine.get(&g) {
                want[..8].copy_from_slice(&v.to_ne_bytes());
            }
            if got != want {
                sh.bad_reads.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            let v = rng | 1;
            sh.mems[r].word(p * PAGE).store(v, Ordering::Relaxed);
            mine.insert(g, v);
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
    }
    mine.into_iter().collect()
}

/// A target vCPU's writes: (global page, value of its first word).
type Writes = Vec<(u64, u64)>;

/// The software VM: memory, a dirty log kept by its vCPU threads, vCPU threads.
struct MmapVm {
    sh: Arc<Shared>,
    vcpus: u32,
    threads: Mutex<Vec<JoinHandle<Writes>>>,
    seeds: Mutex<Vec<Option<u64>>>,
    /// Copies of memory taken in `save_state` (while paused), one per member.
    captured: Mutex<Vec<Vec<Vec<u8>>>>,
}

impl MmapVm {
    fn build(regions: Vec<Region>, vcpus: u32, expected: Option<Arc<Vec<Vec<u8>>>>) -> MmapVm {
        let mems = regions.iter().map(|r| Mem::new(r.size as usize)).collect();
        let dirty = regions
            .iter()
            .map(|r| DirtyBitmap::new(r.size / PAGE))
            .collect();
        MmapVm {
            sh: Arc::new(Shared {
                regions,
                mems,
                dirty,
                tracking: AtomicBool::new(false),
                pause_req: AtomicBool::new(false),
                gate: Mutex::new(Gate::default()),
                cv: Condvar::new(),
                ops: AtomicU64::new(0),
                expected,
                bad_reads: AtomicU64::new(0),
            }),
            vcpus,
            threads: Mutex::new(Vec::new()),
            seeds: Mutex::new(vec![None; vcpus as usize]),
            captured: Mutex::new(Vec::new()),
        }
    }

    /// A running source: half its pages non-zero, `vcpus` writers.
    fn source(regions: Vec<Region>, vcpus: u32) -> MmapVm {
        let vm = MmapVm::build(regions, vcpus, None);
        for (r, m) in vm.sh.mems.iter().enumerate() {
            for p in 0..m.len as u64 / PAGE {
                if splitmix(p * 7 + r as u64) % 2 == 0 {
                    for w in (0..PAGE).step_by(512) {
                        m.word(p * PAGE + w)
                            .store(splitmix(p ^ w ^ 0xabc), Ordering::Relaxed);
                    }
                }
            }
        }
        let seeds: Vec<u64> = (0..vcpus).map(|i| 0x5eed + u64::from(i)).collect();
        for s in seeds {
            let sh = vm.sh.clone();
            vm.threads.lock().unwrap().push(std::thread::spawn(move || {
                source_vcpu(&sh, s);
                Vec::new()
            }));
        }
        vm
    }

    fn stop(&self) -> Vec<(u64, u64)> {
        self.sh.gate.lock().unwrap().stop = true;
        self.sh.pause_req.store(true, Ordering::Release);
        self.sh.cv.notify_all();
        let threads: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("vCPU thread"))
            .collect()
    }
}

impl Drop for MmapVm {
    fn drop(&mut self) {
        self.stop();
    }
}

impl MigrationMemory for MmapVm {
    fn page_size(&self) -> u32 {
        PAGE as u32
    }
    fn regions(&self) -> Vec<Region> {
        self.sh.regions.clone()
    }
    fn region_memory(&self, index: usize) -> Option<RegionMemory> {
        let m = self.sh.mems.get(index)?;
        // SAFETY: the mapping lives as long as the VM, which outlives any snapshot or restore
        // that borrows it; vCPU threads write it only with atomics and park on pause.
        Some(unsafe { RegionMemory::new(m.ptr, m.len) })
    }
}

impl DirtyTracker for MmapVm {
    fn kind(&self) -> TrackerKind {
        TrackerKind::DirtyLog
    }
    fn start(&self) -> Result<(), TrackerError> {
        self.sh.tracking.store(true, Ordering::Release);
        Ok(())
    }
    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), TrackerError> {
        self.sh.dirty[index].take_or_into(out);
        Ok(())
    }
    fn stop(&self) -> Result<(), TrackerError> {
        self.sh.tracking.store(false, Ordering::Release);
        Ok(())
    }
}

impl Vcpus for MmapVm {
    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }
    fn pause(&self) -> Result<(), VmError> {
        self.sh.pause_req.store(true, Ordering::Release);
        let mut g = self.sh.gate.lock().unwrap();
        g.paused = true;
        let running = self.threads.lock().unwrap().len();
        while g.parked < running && !g.stop {
            g = self.sh.cv.wait(g).unwrap();
        }
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        let mut g = self.sh.gate.lock().unwrap();
        g.paused = false;
        self.sh.pause_req.store(false, Ordering::Release);
        self.sh.cv.notify_all();
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        let copy = self.sh.mems.iter().map(Mem::copy).collect();
        self.captured.lock().unwrap().push(copy);
        Ok((0..self.vcpus)
            .map(|i| (0x7a6e_0000 + u64::from(i)).to_le_bytes().to_vec())
            .collect())
    }
}

impl MigrationSource for MmapVm {
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
}

impl VcpuRestore for MmapVm {
    fn restore_state(&self, vcpu: u32, blob: &[u8]) -> Result<(), VmError> {
        let b: [u8; 8] = blob.try_into().map_err(|_| "bad vCPU state")?;
        self.seeds.lock().unwrap()[vcpu as usize] = Some(u64::from_le_bytes(b));
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        let seeds: Vec<u64> = self
            .seeds
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.ok_or("a vCPU state is missing"))
            .collect::<Result<_, _>>()?;
        let n = u64::from(self.vcpus);
        for (i, s) in seeds.into_iter().enumerate() {
            let sh = self.sh.clone();
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::spawn(move || target_vcpu(&sh, i as u64, n, s)));
        }
        Ok(())
    }
}

impl MigrationTarget for MmapVm {
    type Memory = Self;
    type Vcpus = Self;
    fn memory(&self) -> &Self {
        self
    }
    fn vcpus(&self) -> &Self {
        self
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dirtylog-uffd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn layout() -> Vec<Region> {
    vec![
        Region {
            slot: 0,
            gpa: 0,
            size: 16 << 20,
        },
        Region {
            slot: 3,
            gpa: 1 << 32,
            size: 4 << 20,
        },
    ]
}

/// The chain ending at `tip`, region by region.
fn chain_image(tip: &Path) -> Vec<Vec<u8>> {
    let chain = Chain::open(tip, true).expect("the chain opens and checks");
    chain
        .header()
        .regions()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut b = vec![0u8; r.size as usize];
            chain.read_pages(i, 0, &mut b).expect("read the chain");
            b
        })
        .collect()
}

fn first_difference(a: &[Vec<u8>], b: &[Vec<u8>]) -> Option<(usize, usize)> {
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        if let Some(p) = x
            .chunks(PAGE as usize)
            .zip(y.chunks(PAGE as usize))
            .position(|(u, v)| u != v)
        {
            return Some((r, p));
        }
    }
    None
}

/// Take a full member and three diffs in background mode while the vCPUs write flat out;
/// each member equals memory as it was at its pause. Then restore the chain lazily with
/// readers and writers running during the prefetch.
#[test]
fn background_members_equal_memory_at_the_pause_and_lazy_restore_serves_them() {
    let dir = scratch("bg");
    let vm = MmapVm::source(layout(), 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut snap = Snapshotter::new(&vm, &dir, None).unwrap();
    let cfg = CreateConfig {
        mode: SnapshotMode::Background,
        ..Default::default()
    };
    let mut during = Vec::new();
    for k in 0..4 {
        let before = vm.sh.ops.load(Ordering::Relaxed);
        let stats = snap
            .take(&cfg)
            .unwrap_or_else(|e| panic!("member {k}: {e}"));
        during.push(vm.sh.ops.load(Ordering::Relaxed) - before);
        assert_eq!(stats.kind, if k == 0 { "full" } else { "diff" });
        let at_pause = vm.captured.lock().unwrap()[k].clone();
        let saved = chain_image(&stats.path);
        if let Some((r, p)) = first_difference(&saved, &at_pause) {
            panic!("member {k}: region {r} page {p} differs from memory at the pause");
        }
        if k > 0 {
            let total: u64 = layout().iter().map(|r| r.size / PAGE).sum();
            assert!(stats.pages < total, "a diff carries only dirty pages");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    snap.finish().unwrap();
    let captured = vm.captured.lock().unwrap().clone();
    drop(vm);
    eprintln!("guest writes during each background member: {during:?}");

    // Lazy restore of the tip, with readers and writers from the first instruction on.
    let tip = dir.join("3");
    let expected = Arc::new(chain_image(&tip));
    assert!(first_difference(&expected, &captured[3]).is_none());
    let exp = expected.clone();
    let (target, stats) = restore(
        &tip,
        move |h: &StreamHeader| {
            Ok(MmapVm::build(
                h.regions().to_vec(),
                h.vcpu_count(),
                Some(exp),
            ))
        },
        &RestoreOptions {
            lazy: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ops_at_load = target.sh.ops.load(Ordering::Relaxed);
    assert!(stats.lazy && stats.resumed);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let writes = target.stop();
    assert_eq!(
        target.sh.bad_reads.load(Ordering::Relaxed),
        0,
        "a read saw something other than the chain's contents"
    );
    let mut want = (*expected).clone();
    for (g, v) in writes {
        let (r, p) = target.sh.locate(g);
        let off = (p * PAGE) as usize;
        want[r][off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    let got: Vec<Vec<u8>> = target.sh.mems.iter().map(Mem::copy).collect();
    if let Some((r, p)) = first_difference(&got, &want) {
        panic!("after the lazy restore, region {r} page {p} differs from the chain's");
    }
    eprintln!(
        "lazy restore: resumed after {:?}, all in after {:?}; guest operations before all was in: {ops_at_load}",
        stats.time_to_resume, stats.duration
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A corrupted page in the tip's memory file: the lazy restore (which does not read every
/// chunk before resuming) fails with a hash mismatch once every page is in.
#[test]
fn lazy_restore_of_a_corrupted_member_fails_after_loading() {
    let dir = scratch("corrupt");
    let vm = MmapVm::source(layout(), 1);
    let mut snap = Snapshotter::new(&vm, &dir, None).unwrap();
    snap.take(&CreateConfig::default()).unwrap();
    snap.finish().unwrap();
    drop(vm);
    // Flip a byte of a non-zero page of region 0.
    let image = chain_image(&dir.join("0"));
    let p = image[0]
        .chunks(PAGE as usize)
        .position(|pg| pg.iter().any(|&b| b != 0))
        .expect("a non-zero page");
    let file = dir.join("0").join("mem-0.raw");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[p * PAGE as usize + 100] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let r = restore(
        &dir.join("0"),
        |h: &StreamHeader| {
            Ok(MmapVm::build(
                h.regions().to_vec(),
                h.vcpu_count(),
                Some(Arc::new(Vec::new())),
            ))
        },
        &RestoreOptions {
            lazy: true,
            resume: false,
            ..Default::default()
        },
    );
    match r {
        Err(SnapshotError::HashMismatch { slot: 0, .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a corrupted member restored"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs of `mib` MiB (the test needs root, as CI runs), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(name: &str, mib: u64) -> Tmpfs {
        let path = scratch(name);
        std::fs::create_dir_all(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A background member that fails mid-way (the disk fills): the error is `DiskFull`, no
/// writer stays blocked on a protected page, nothing stays registered (a second attempt
/// registers again and fails the same way, not with `EBUSY`), and no temporary member is left.
#[test]
fn a_failing_background_member_leaves_no_writer_blocked() {
    let fs = Tmpfs::new("full", 4);
    let dir = fs.0.join("chain");
    let vm = MmapVm::source(layout(), 2);
    let mut snap = Snapshotter::new(&vm, &dir, None).unwrap();
    let cfg = CreateConfig {
        mode: SnapshotMode::Background,
        ..Default::default()
    };
    for attempt in 0..2 {
        match snap.take(&cfg) {
            Err(SnapshotError::DiskFull { .. }) => {}
            Err(e) => panic!("attempt {attempt}: wrong error: {e}"),
            Ok(_) => panic!("attempt {attempt}: 10 MiB of pages fit in a 4 MiB tmpfs"),
        }
        let before = vm.sh.ops.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while vm.sh.ops.load(Ordering::Relaxed) < before + 10_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "attempt {attempt}: the vCPUs are stuck after the failed member"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    snap.finish().unwrap();
}

/// An eager restore into page-aligned memory loads through userfaultfd (data runs only, holes
/// left untouched): a chain of a full member and two diffs taken while the vCPUs write comes
/// back byte for byte, and holes read as zeros.
#[test]
fn eager_restore_through_userfaultfd_equals_the_chain() {
    let dir = scratch("eager");
    let vm = MmapVm::source(layout(), 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut snap = Snapshotter::new(&vm, &dir, None).unwrap();
    for _ in 0..3 {
        snap.take(&CreateConfig::default()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    snap.finish().unwrap();
    drop(vm);
    let tip = dir.join("2");
    let expected = chain_image(&tip);
    let (target, stats) = restore(
        &tip,
        |h: &StreamHeader| {
            Ok(MmapVm::build(
                h.regions().to_vec(),
                h.vcpu_count(),
                Some(Arc::new(Vec::new())),
            ))
        },
        &RestoreOptions {
            resume: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!stats.lazy && !stats.resumed);
    let got: Vec<Vec<u8>> = target.sh.mems.iter().map(Mem::copy).collect();
    if let Some((r, p)) = first_difference(&got, &expected) {
        panic!("after the eager restore, region {r} page {p} differs from the chain's");
    }
    let total: u64 = layout().iter().map(|r| r.size / PAGE).sum();
    assert!(stats.pages > 0 && stats.pages <= total);
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}
