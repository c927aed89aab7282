//! [`Snapshotter`]: takes the members of a chain from a running guest, in stop and live
//! mode here (background mode, [`SnapshotMode::Background`], in the private `background`
//! module).
//!
//! **No write is lost between members.** Tracking starts once, in [`Snapshotter::new`], and
//! runs until [`Snapshotter::finish`]. Every harvest ORs the tracker's bits (and the VMM's)
//! into the *pending* set: the pages written since the last member's pause point that no
//! committed member holds yet. A member takes the pending set (every page for a full member),
//! re-arms those pages under manual protect just before copying them (`clear` with the
//! harvested bits only, as the migration engine does), and copies them. The final harvest of
//! a member happens with the guest paused: whatever the guest writes after the resume lands
//! in the tracker and so in the next member. A member that fails puts its pages back in the
//! pending set.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dirtylog::bitmap::runs;
use dirtylog::DirtyTracker;
use dirtylog_migrate::digest::{paused_digest, DigestTable};
use dirtylog_migrate::wire::StreamHeader;
use dirtylog_migrate::{MigrationMemory, MigrationSource, RegionMemory, Vcpus};
use serde::Serialize;

use crate::chain::Chain;
use crate::error::SnapshotError;
use crate::format::{
    hex, Kind, Manifest, ManifestStats, ParentRef, RegionEntry, SnapshotMode, FORMAT,
};
use crate::write::{clean_leftovers, Member};

/// Bytes copied from guest memory per write.
const BATCH_BYTES: usize = 4 << 20;

/// A progress report: bytes done of the total, in a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// `bulk`, `round N`, `final`, `restore`, `merge`, ...
    pub phase: &'static str,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in the phase.
    pub total_bytes: u64,
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How to take a member.
#[derive(Clone)]
pub struct CreateConfig {
    /// Stop, live or background.
    pub mode: SnapshotMode,
    /// Live: pre-copy rounds before the final pause (default 8).
    pub max_rounds: u32,
    /// Called as bytes are written.
    pub progress: Option<ProgressFn>,
    /// Stop and live: while paused, digest the source's memory and refuse the member if it
    /// differs from what the chain holds (a write the tracker missed). Costs one read of
    /// the guest memory ever written in the pause (about 50 ms per GiB; never-written memory
    /// costs a page-table walk: a diff of a 4 GiB guest paused 24–64 ms instead of 149–163).
    /// Default on.
    pub verify_source: bool,
}

impl Default for CreateConfig {
    fn default() -> Self {
        CreateConfig {
            mode: SnapshotMode::Stop,
            max_rounds: 8,
            progress: None,
            verify_source: true,
        }
    }
}

impl std::fmt::Debug for CreateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateConfig")
            .field("mode", &self.mode)
            .field("max_rounds", &self.max_rounds)
            .field("progress", &self.progress.is_some())
            .field("verify_source", &self.verify_source)
            .finish()
    }
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// What taking one member did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotStats {
    /// The member's directory.
    pub path: PathBuf,
    /// `full` or `diff`.
    pub kind: &'static str,
    /// Pages the member carries.
    pub pages: u64,
    /// Bytes written to its memory files (zero pages cost nothing).
    pub bytes_written: u64,
    /// How long the guest was paused (ms in JSON).
    #[serde(serialize_with = "ser_ms", rename = "pause-ms")]
    pub pause: Duration,
    /// How long the member took, from the start to the rename (ms in JSON).
    #[serde(serialize_with = "ser_ms", rename = "duration-ms")]
    pub duration: Duration,
    /// Pre-copy rounds, the final one included (1 in stop mode).
    pub rounds: u32,
    /// Bytes written per second of `duration`.
    pub throughput_bytes_per_sec: u64,
}

/// Takes the members of a chain from a running guest. See the [module docs](self).
pub struct Snapshotter<'s, S: MigrationSource> {
    src: &'s S,
    dir: PathBuf,
    pub(crate) header: StreamHeader,
    pub(crate) mems: Vec<RegionMemory>,
    page_size: u64,
    /// Pages written since the last member's pause point that no committed member holds.
    pending: Vec<Vec<u64>>,
    /// The pages the open member has taken from the pending set: back into it if the member
    /// fails.
    taken: Vec<Vec<u64>>,
    /// The page hashes of the memory the chain holds (moved into the open member).
    tables: Option<Vec<DigestTable>>,
    next_index: u64,
    /// The parent of the next member: as recorded, and its manifest hash.
    parent: Option<(String, u64)>,
    tracking: bool,
    /// The member being written.
    pub(crate) member: Option<Member>,
    /// When the current member started.
    started: Instant,
    /// Pause time of the current member.
    pub(crate) pause: Duration,
    /// Rounds of the current member.
    pub(crate) rounds: u32,
    mode: SnapshotMode,
}

/// Copy `dst.len()` bytes at `offset` of `mem` into `dst`, word by word with relaxed atomic
/// loads: well defined while vCPUs write the same memory (a torn page is re-dirtied and
/// copied again later).
///
/// # Panics
/// If the range is not 8-byte aligned or not inside the region (callers pass page ranges of
/// checked regions).
pub(crate) fn copy_from_guest(mem: RegionMemory, offset: usize, dst: &mut [u8]) {
    assert!(
        offset % 8 == 0 && dst.len() % 8 == 0 && mem.as_ptr() as usize % 8 == 0,
        "unaligned guest memory access"
    );
    assert!(
        offset
            .checked_add(dst.len())
            .is_some_and(|e| e <= mem.len()),
        "guest memory access past the region"
    );
    // SAFETY: the range is inside the region's mapping (checked above), which the VM keeps
    // valid while the snapshotter borrows it (the `RegionMemory::new` contract), and 8-byte
    // aligned; `AtomicU64` has u64's size and alignment and may alias memory that vCPUs write
    // concurrently, since every access through it is atomic.
    let src = unsafe {
        std::slice::from_raw_parts(mem.as_ptr().add(offset).cast::<AtomicU64>(), dst.len() / 8)
    };
    for (d, s) in dst.chunks_exact_mut(8).zip(src) {
        d.copy_from_slice(&s.load(Ordering::Relaxed).to_ne_bytes());
    }
}

/// The digest of each region of paused memory.
///
/// # Safety
/// Nobody writes the regions during the call (the guest is paused).
pub(crate) unsafe fn digest_paused(mems: &[RegionMemory], page: usize) -> Vec<u64> {
    mems.iter()
        .map(|m| {
            // SAFETY: a valid mapping (memory contract) that nobody writes during the call
            // (the caller's promise).
            let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
            paused_digest(bytes, page)
        })
        .collect()
}

fn word_mask(npages: u64, w: usize) -> u64 {
    let first = w as u64 * 64;
    match npages.saturating_sub(first) {
        0 => 0,
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

/// The member numbers in chain directory `dir`.
pub(crate) fn member_numbers(dir: &Path) -> Result<Vec<u64>, SnapshotError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| SnapshotError::io("read", dir, e))?;
    for e in entries {
        let e = e.map_err(|e| SnapshotError::io("read", dir, e))?;
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl<'s, S: MigrationSource> Snapshotter<'s, S> {
    /// Start tracking `src`; members go to `dir` (created if missing; refuses a dir that
    /// holds a chain unless `parent` is given). `parent`: the tip of a chain `src` was
    /// restored from (then the first member written is a diff against it, numbered after the
    /// parent when the parent is in `dir`, else after the last member in `dir`). With a
    /// parent, create this before the restored guest first runs (restore with
    /// `RestoreOptions::resume` off), or its first writes are missed.
    pub fn new(src: &'s S, dir: &Path, parent: Option<&Path>) -> Result<Self, SnapshotError> {
        let memory = src.memory();
        let regions = memory.regions();
        let header = StreamHeader::new(memory.page_size(), src.vcpus().vcpu_count(), regions)
            .map_err(|e| SnapshotError::Usage(format!("the VM's layout cannot be saved: {e}")))?;
        let page_size = u64::from(header.page_size());
        let mut mems = Vec::new();
        for (i, r) in header.regions().iter().enumerate() {
            let m = memory.region_memory(i).ok_or_else(|| {
                SnapshotError::Usage(format!("slot {}: the VM has no memory for it", r.slot))
            })?;
            if m.len() as u64 != r.size || m.as_ptr().is_null() || m.as_ptr() as usize % 8 != 0 {
                return Err(SnapshotError::Usage(format!(
                    "slot {}: the VM maps {} bytes for a region of {}",
                    r.slot,
                    m.len(),
                    r.size
                )));
            }
            mems.push(m);
        }
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| SnapshotError::io("create", dir, e))?;
            // The new directory's own entry, durable before any member relies on it.
            if let Some(up) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                crate::write::sync_dir(up)?;
            }
        }
        clean_leftovers(dir);
        let existing = member_numbers(dir)?;
        let tables: Vec<DigestTable> = header
            .regions()
            .iter()
            .map(|r| DigestTable::new((r.size / page_size) as usize, page_size as usize))
            .collect();
        let (next_index, parent_ref) = match parent {
            None => {
                if !existing.is_empty() {
                    return Err(SnapshotError::Usage(format!(
                        "{} already holds a chain (members {existing:?}): choose another \
                         directory, or give its tip as the parent",
                        dir.display()
                    )));
                }
                (0, None)
            }
            Some(p) => {
                let chain = Chain::open(p, true)?;
                if chain.header() != &header {
                    return Err(SnapshotError::member(
                        p,
                        "its memory layout or vCPU count differs from this VM's: not the \
                         snapshot this VM was restored from",
                    ));
                }
                // The chain's page hashes, so that the next digest covers all memory.
                let mut buf = vec![0u8; BATCH_BYTES];
                for (i, r) in header.regions().iter().enumerate() {
                    let npages = r.size / page_size;
                    let per = (BATCH_BYTES as u64 / page_size).max(1);
                    let mut first = 0;
                    while first < npages {
                        let n = per.min(npages - first);
                        let b = &mut buf[..(n * page_size) as usize];
                        chain.read_pages(i, first, b)?;
                        tables[i].record(first, b);
                        first += n;
                    }
                }
                let pdir = p.parent().map(Path::to_path_buf).unwrap_or_default();
                let same_dir = match (pdir.canonicalize(), dir.canonicalize()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                };
                let pnum = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<u64>().ok());
                let (index, recorded) = match (same_dir, pnum) {
                    (true, Some(n)) => (n + 1, format!("../{n}")),
                    _ => {
                        let abs = p
                            .canonicalize()
                            .map_err(|e| SnapshotError::io("resolve", p, e))?;
                        let next = existing.last().map_or(0, |&l| l + 1);
                        (next, abs.to_string_lossy().into_owned())
                    }
                };
                if existing.contains(&index) {
                    return Err(SnapshotError::Usage(format!(
                        "{} already holds member {index} after the parent {}: the chain goes on \
                         there already; snapshot into another directory",
                        dir.display(),
                        p.display()
                    )));
                }
                (index, Some((recorded, chain.tip_manifest_hash())))
            }
        };
        src.tracker()
            .start()
            .map_err(SnapshotError::vm("start tracking"))?;
        let pending: Vec<Vec<u64>> = header
            .regions()
            .iter()
            .map(|r| vec![0u64; (r.size / page_size).div_ceil(64) as usize])
            .collect();
        Ok(Snapshotter {
            src,
            dir: dir.to_path_buf(),
            header,
            mems,
            page_size,
            taken: pending.clone(),
            pending,
            tables: Some(tables),
            next_index,
            parent: parent_ref,
            tracking: true,
            member: None,
            started: Instant::now(),
            pause: Duration::ZERO,
            rounds: 0,
            mode: SnapshotMode::Stop,
        })
    }

    /// The source VM.
    pub fn source(&self) -> &'s S {
        self.src
    }

    /// The chain directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The number the next member gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Harvest the tracker (and the VMM's bitmaps) into the pending set without writing
    /// anything: call it now and then between members with a ring tracker, so that the
    /// rings do not fill and stall the vCPUs. Returns the pending pages.
    pub fn sync(&mut self) -> Result<u64, SnapshotError> {
        self.harvest()
    }

    /// Write the next member (full first, diffs after) in `cfg.mode`; the guest runs on
    /// afterwards.
    pub fn take(&mut self, cfg: &CreateConfig) -> Result<SnapshotStats, SnapshotError> {
        if !self.tracking {
            return Err(SnapshotError::Usage("the snapshotter has finished".into()));
        }
        match cfg.mode {
            SnapshotMode::Stop => self.take_stop(cfg),
            SnapshotMode::Live => self.take_live(cfg),
            SnapshotMode::Background => crate::background::take(self, cfg),
        }
    }

    /// Stop tracking.
    pub fn finish(mut self) -> Result<(), SnapshotError> {
        self.tracking = false;
        self.src
            .tracker()
            .stop()
            .map_err(SnapshotError::vm("stop tracking"))
    }

    /// OR the tracker's and the VMM's dirty bits into the pending set. Returns the number of
    /// pending pages.
    pub(crate) fn harvest(&mut self) -> Result<u64, SnapshotError> {
        let memory = self.src.memory();
        let mut n = 0;
        for (i, words) in self.pending.iter_mut().enumerate() {
            self.src
                .tracker()
                .harvest(i, words)
                .map_err(SnapshotError::vm("harvest"))?;
            if let Some(vmm) = memory.vmm_bitmap(i) {
                vmm.take_or_into(words);
            }
            let npages = self.header.regions()[i].size / self.page_size;
            if let Some(last) = words.len().checked_sub(1) {
                words[last] &= word_mask(npages, last);
            }
            n += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        Ok(n)
    }

    /// The pages the open member must hold now: every page for a full member's first call,
    /// else the pending set. Empties the pending set and, under manual protect, re-arms its
    /// pages (the harvested bits only) before the caller copies them.
    pub(crate) fn take_pending(&mut self, all: bool) -> Result<Vec<Vec<u64>>, SnapshotError> {
        let tracker = self.src.tracker();
        if tracker.kind().manual_protect() {
            for (i, words) in self.pending.iter().enumerate() {
                // In pieces of 1 GiB of 4 KiB pages, as the migration engine re-arms.
                for (c, piece) in words.chunks(4096).enumerate() {
                    if piece.iter().any(|&w| w != 0) {
                        tracker
                            .clear(i, c as u64 * 4096 * 64, piece)
                            .map_err(SnapshotError::vm("clear"))?;
                    }
                }
            }
        }
        let mut out: Vec<Vec<u64>> = self
            .pending
            .iter_mut()
            .map(|w| {
                let taken = w.clone();
                w.fill(0);
                taken
            })
            .collect();
        if all {
            for (i, words) in out.iter_mut().enumerate() {
                let npages = self.header.regions()[i].size / self.page_size;
                for (w, word) in words.iter_mut().enumerate() {
                    *word = word_mask(npages, w);
                }
            }
        }
        for (t, o) in self.taken.iter_mut().zip(&out) {
            for (a, b) in t.iter_mut().zip(o) {
                *a |= b;
            }
        }
        Ok(out)
    }

    /// Is the next member a full one?
    pub(crate) fn next_is_full(&self) -> bool {
        self.parent.is_none()
    }

    /// Open the next member in its temporary directory.
    pub(crate) fn begin(&mut self, mode: SnapshotMode) -> Result<(), SnapshotError> {
        if self.member.is_some() {
            return Err(SnapshotError::Usage("a member is already open".into()));
        }
        let tables = self
            .tables
            .take()
            .ok_or_else(|| SnapshotError::Usage("the page hashes are gone".into()))?;
        let kind = if self.next_is_full() {
            Kind::Full
        } else {
            Kind::Diff
        };
        match Member::create(
            &self.dir,
            self.next_index,
            kind,
            self.header.page_size(),
            self.header.regions(),
            tables,
        ) {
            Ok(m) => self.member = Some(m),
            Err((e, tables)) => {
                self.tables = Some(tables);
                return Err(e);
            }
        }
        for t in &mut self.taken {
            t.fill(0);
        }
        self.started = Instant::now();
        self.pause = Duration::ZERO;
        self.rounds = 0;
        self.mode = mode;
        Ok(())
    }

    fn open_member(&self) -> Result<&Member, SnapshotError> {
        self.member
            .as_ref()
            .ok_or_else(|| SnapshotError::Usage("no member is open".into()))
    }

    /// While paused: save the vCPU states and device sections into the open member.
    pub(crate) fn save_states(&mut self) -> Result<(), SnapshotError> {
        let vcpus = self
            .src
            .vcpus()
            .save_state()
            .map_err(SnapshotError::vm("save vCPU state"))?;
        if vcpus.len() != self.header.vcpu_count() as usize {
            return Err(SnapshotError::Usage(format!(
                "the VM saved {} vCPU states for {} vCPUs",
                vcpus.len(),
                self.header.vcpu_count()
            )));
        }
        let devices = match self.src.devices() {
            Some(d) => d
                .save_devices()
                .map_err(SnapshotError::vm("save device state"))?,
            None => Vec::new(),
        };
        let m = self
            .member
            .as_mut()
            .ok_or_else(|| SnapshotError::Usage("no member is open".into()))?;
        m.set_vcpus(vcpus);
        m.set_devices(devices);
        Ok(())
    }

    /// Copy the pages of `set` from guest memory into the open member, in batches of up to
    /// 4 MiB per `pwrite`.
    pub(crate) fn write_set(
        &self,
        set: &[Vec<u64>],
        phase: &'static str,
        cfg: &CreateConfig,
    ) -> Result<u64, SnapshotError> {
        let m = self.open_member()?;
        let page = self.page_size;
        let total: u64 = set
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            * page;
        let mut done = 0;
        let mut buf = vec![0u8; BATCH_BYTES];
        let per = (BATCH_BYTES as u64 / page).max(1);
        for (i, words) in set.iter().enumerate() {
            for (first, n) in runs(words) {
                let mut p = first;
                while p < first + n {
                    let k = per.min(first + n - p);
                    let b = &mut buf[..(k * page) as usize];
                    copy_from_guest(self.mems[i], (p * page) as usize, b);
                    m.write_run(i, p, b)?;
                    p += k;
                    done += k * page;
                    if let Some(f) = &cfg.progress {
                        f(Progress {
                            phase,
                            done_bytes: done,
                            total_bytes: total,
                        });
                    }
                }
            }
        }
        Ok(total / page)
    }

    /// While paused, with every page written: compare the memory's digest with the chain's.
    pub(crate) fn check_source(&self) -> Result<(), SnapshotError> {
        let m = self.open_member()?;
        // SAFETY: called between pause and resume: nobody writes guest memory.
        let actual = unsafe { digest_paused(&self.mems, self.page_size as usize) };
        for ((r, t), a) in self.header.regions().iter().zip(&m.tables).zip(actual) {
            let expected = t.digest();
            if expected != a {
                return Err(SnapshotError::HashMismatch {
                    slot: r.slot,
                    at: "at the snapshot point: the tracker missed a write (the snapshot was \
                         discarded)"
                        .into(),
                    expected,
                    actual: a,
                });
            }
        }
        Ok(())
    }

    /// Write the manifest and rename the open member into place.
    pub(crate) fn commit(&mut self) -> Result<SnapshotStats, SnapshotError> {
        let m = self.open_member()?;
        let page = self.page_size;
        let regions = self
            .header
            .regions()
            .iter()
            .zip(&m.tables)
            .map(|(r, t)| RegionEntry {
                slot: r.slot,
                guest_phys_addr: r.gpa,
                size: r.size,
                pages_present: 0,
                memory_xxh3: hex(t.digest()),
            })
            .collect();
        let duration = self.started.elapsed();
        let bytes = m.bytes_written();
        let pages = m.pages();
        let mut manifest = Manifest {
            format: FORMAT,
            kind: m.kind,
            parent: self.parent.as_ref().map(|(p, h)| ParentRef {
                path: p.clone(),
                manifest_xxh3: hex(*h),
            }),
            page_size: self.header.page_size(),
            vcpu_count: self.header.vcpu_count(),
            regions,
            tracker: self.src.tracker().kind().to_string(),
            mode: self.mode,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            files: Vec::new(),
            stats: ManifestStats {
                pages,
                bytes_written: bytes,
                pause_us: self.pause.as_micros() as u64,
                duration_us: duration.as_micros() as u64,
                rounds: self.rounds,
            },
        };
        let _ = page;
        let kind = m.kind;
        match m.commit(&mut manifest) {
            Ok((path, json)) => {
                let member = self.member.take().expect("checked open above");
                self.tables = Some(member.into_tables());
                self.parent = Some((
                    format!("../{}", self.next_index),
                    dirtylog_migrate::digest::mem_hash(&json),
                ));
                self.next_index += 1;
                let duration = self.started.elapsed();
                Ok(SnapshotStats {
                    path,
                    kind: kind.name(),
                    pages,
                    bytes_written: bytes,
                    pause: self.pause,
                    duration,
                    rounds: self.rounds,
                    throughput_bytes_per_sec: (bytes as f64 / duration.as_secs_f64().max(1e-9))
                        as u64,
                })
            }
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Discard the open member: remove its temporary directory and put the pages it took
    /// (and any it wrote) back in the pending set, so that the next member holds them.
    pub(crate) fn abort(&mut self) {
        if let Some(m) = self.member.take() {
            let (tables, present) = m.discard();
            for ((pending, p), taken) in self.pending.iter_mut().zip(&present).zip(&mut self.taken)
            {
                let mut words = vec![0u64; p.words()];
                p.snapshot_into(&mut words);
                for ((a, b), t) in pending.iter_mut().zip(words).zip(taken.iter_mut()) {
                    *a |= b | *t;
                    *t = 0;
                }
            }
            self.tables = Some(tables);
        }
    }

    /// Run `f` with the guest paused; resume whatever happens, adding the pause to the
    /// member's.
    fn paused<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let t = Instant::now();
        self.src
            .vcpus()
            .pause()
            .map_err(SnapshotError::vm("pause"))?;
        let r = f(self);
        let resumed = self
            .src
            .vcpus()
            .resume()
            .map_err(SnapshotError::vm("resume"));
        self.pause += t.elapsed();
        let v = r?;
        resumed?;
        Ok(v)
    }

    fn take_stop(&mut self, cfg: &CreateConfig) -> Result<SnapshotStats, SnapshotError> {
        self.begin(SnapshotMode::Stop)?;
        let full = self.next_is_full();
        let r = self.paused(|s| {
            s.harvest()?;
            let set = s.take_pending(full)?;
            s.save_states()?;
            s.rounds = 1;
            s.write_set(&set, "final", cfg)?;
            if cfg.verify_source {
                s.check_source()?;
            }
            Ok(())
        });
        match r {
            Ok(()) => self.commit(),
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    fn take_live(&mut self, cfg: &CreateConfig) -> Result<SnapshotStats, SnapshotError> {
        self.begin(SnapshotMode::Live)?;
        let r = self.live_rounds(cfg);
        match r {
            Ok(()) => self.commit(),
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    fn live_rounds(&mut self, cfg: &CreateConfig) -> Result<(), SnapshotError> {
        /// Pending pages small enough for the final pause.
        const FINAL_PAGES: u64 = 256;
        const PHASES: [&str; 9] = [
            "bulk", "round 1", "round 2", "round 3", "round 4", "round 5", "round 6", "round 7",
            "round 8+",
        ];
        let full = self.next_is_full();
        self.harvest()?;
        let set = self.take_pending(full)?;
        let mut prev = self.write_set(&set, PHASES[0], cfg)?;
        self.rounds = 1;
        while self.rounds <= cfg.max_rounds {
            let pending = self.harvest()?;
            if pending <= FINAL_PAGES || (self.rounds > 1 && pending * 2 > prev) {
                break;
            }
            let set = self.take_pending(false)?;
            prev = self.write_set(&set, PHASES[(self.rounds as usize).min(8)], cfg)?;
            self.rounds += 1;
        }
        self.paused(|s| {
            s.harvest()?;
            let set = s.take_pending(false)?;
            s.save_states()?;
            s.rounds += 1;
            s.write_set(&set, "final", cfg)?;
            if cfg.verify_source {
                s.check_source()?;
            }
            Ok(())
        })
    }
}

impl<S: MigrationSource> Drop for Snapshotter<'_, S> {
    fn drop(&mut self) {
        self.abort();
        if self.tracking {
            let _ = self.src.tracker().stop();
        }
    }
}
