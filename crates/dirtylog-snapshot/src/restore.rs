//! Eager restore: check the whole chain, build the target, load every page, restore the vCPU
//! and device state, check the memory's digest against the tip's record, then resume. The
//! memory is loaded through userfaultfd where the target's memory allows (see
//! `lazy::load_all`): no page is zero-filled before being overwritten, holes are not touched.
//! Nothing runs if any check fails: the target is dropped without ever being resumed.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use dirtylog_migrate::digest::{paused_digest, DigestTable};
use dirtylog_migrate::wire::StreamHeader;
use dirtylog_migrate::{
    DeviceState, MigrationMemory, MigrationTarget, RegionMemory, VcpuRestore, VmError,
};
use serde::Serialize;

use crate::chain::Chain;
use crate::create::{Progress, ProgressFn};
use crate::error::SnapshotError;
use crate::format::mem_file;

/// How to restore.
#[derive(Clone)]
pub struct RestoreOptions {
    /// Resume the guest before memory is loaded and serve each first touch on demand.
    pub lazy: bool,
    /// Called as bytes are loaded.
    pub progress: Option<ProgressFn>,
    /// Resume the guest at the end (default). Off: the caller resumes it — after starting a
    /// [`Snapshotter`](crate::Snapshotter) on it, so that a diff against this chain misses
    /// no write.
    pub resume: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            lazy: false,
            progress: None,
            resume: true,
        }
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("lazy", &self.lazy)
            .field("progress", &self.progress.is_some())
            .field("resume", &self.resume)
            .finish()
    }
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreStats {
    /// Members in the chain.
    pub members: usize,
    /// Pages loaded from the files (zero pages cost nothing).
    pub pages: u64,
    /// Bytes read from the memory files.
    pub bytes_read: u64,
    /// From the call to the guest's resume (or to the end, without resume), ms in JSON.
    #[serde(serialize_with = "ser_ms", rename = "time-to-resume-ms")]
    pub time_to_resume: Duration,
    /// From the call until every page was loaded, ms in JSON.
    #[serde(serialize_with = "ser_ms", rename = "duration-ms")]
    pub duration: Duration,
    /// Of which checking the chain's checksums and the memory digest, ms in JSON.
    #[serde(serialize_with = "ser_ms", rename = "check-ms")]
    pub check: Duration,
    /// Loaded on demand.
    pub lazy: bool,
    /// The guest was resumed.
    pub resumed: bool,
    /// Bytes loaded per second of `duration`.
    pub throughput_bytes_per_sec: u64,
}

/// Check that `target`'s memory has `header`'s layout; its mappings.
pub(crate) fn target_memory<T: MigrationTarget>(
    target: &T,
    header: &StreamHeader,
) -> Result<Vec<RegionMemory>, SnapshotError> {
    let memory = target.memory();
    let regions = memory.regions();
    let same = memory.page_size() == header.page_size()
        && regions.len() == header.regions().len()
        && regions
            .iter()
            .zip(header.regions())
            .all(|(a, b)| a.gpa == b.gpa && a.size == b.size);
    if !same {
        return Err(SnapshotError::Usage(
            "the target VM's memory layout differs from the snapshot's".into(),
        ));
    }
    let mut out = Vec::new();
    for (i, r) in header.regions().iter().enumerate() {
        let m = memory
            .region_memory(i)
            .filter(|m| m.len() as u64 == r.size && !m.as_ptr().is_null())
            .ok_or_else(|| {
                SnapshotError::Usage(format!(
                    "slot {}: the target VM has no memory for it",
                    r.slot
                ))
            })?;
        out.push(m);
    }
    Ok(out)
}

/// Restore the vCPU states and device sections of `chain`'s tip into `target`.
pub(crate) fn restore_states<T: MigrationTarget>(
    chain: &Chain,
    target: &T,
) -> Result<(), SnapshotError> {
    let vcpus = chain.vcpu_states()?;
    let devices = chain.device_sections()?;
    for (i, blob) in vcpus.iter().enumerate() {
        target
            .vcpus()
            .restore_state(i as u32, blob)
            .map_err(SnapshotError::vm("restore vCPU state"))?;
    }
    if !devices.is_empty() {
        let dev: &dyn DeviceState = target.devices().ok_or_else(|| {
            SnapshotError::Usage(format!(
                "the snapshot holds {} device sections and the target VM has no devices",
                devices.len()
            ))
        })?;
        for d in &devices {
            dev.restore_device(d.name(), d.version(), d.bytes())
                .map_err(SnapshotError::vm("restore device state"))?;
        }
    }
    Ok(())
}

/// Rebuild the VM from the chain that ends at `tip` (base + diffs) and run it: open and check
/// the chain (every checksum, on two threads), build the target with `make_target` only
/// then, load each page as of the tip into its memory (the data runs only: holes stay zero),
/// restore the vCPU and device state, check each region's digest against the tip's record,
/// then resume the target's vCPUs (unless `opts.resume` is off). Nothing runs if any check
/// fails. With `opts.lazy` ([`RestoreOptions::lazy`]), the restore is lazy: see the private
/// `lazy` module.
pub fn restore<T, F>(
    tip: &Path,
    make_target: F,
    opts: &RestoreOptions,
) -> Result<(T, RestoreStats), SnapshotError>
where
    T: MigrationTarget,
    F: FnOnce(&StreamHeader) -> Result<T, VmError>,
{
    if opts.lazy {
        return crate::lazy::restore(tip, make_target, opts);
    }
    let t0 = Instant::now();
    let chain = Chain::open(tip, false)?;
    // Every chunk checksum, before any target exists (on both of a small host's cores: a
    // read of every member's data, from the page cache when the chain was just written).
    chain.check_data(CHECK_THREADS)?;
    // Parse the states and the digests before any target exists.
    chain.vcpu_states()?;
    chain.device_sections()?;
    let digests = chain.memory_digests()?;
    let checked = t0.elapsed();
    let (target, mems, pages, bytes_read, tables) = load_target(&chain, make_target, opts)?;
    let tc = Instant::now();
    let page = u64::from(chain.header().page_size());
    for (i, (r, want)) in chain.header().regions().iter().zip(&digests).enumerate() {
        let got = match &tables {
            Some(t) => t[i].digest(),
            None => {
                let mem = mems[i];
                // SAFETY: the target has not been resumed and this restore has finished
                // writing: no one writes its memory during the digest.
                let bytes = unsafe { std::slice::from_raw_parts(mem.as_ptr(), mem.len()) };
                paused_digest(bytes, page as usize)
            }
        };
        if got != *want {
            return Err(SnapshotError::HashMismatch {
                slot: r.slot,
                at: format!(
                    "after restoring {}: the memory loaded differs from the snapshot's record \
                     (the guest was not run)",
                    tip.display()
                ),
                expected: *want,
                actual: got,
            });
        }
    }
    restore_states(&chain, &target)?;
    let check = checked + tc.elapsed();
    if opts.resume {
        target
            .vcpus()
            .resume()
            .map_err(SnapshotError::vm("resume"))?;
    }
    let duration = t0.elapsed();
    Ok((
        target,
        RestoreStats {
            members: chain.members().len(),
            pages,
            bytes_read,
            time_to_resume: duration,
            duration,
            check,
            lazy: false,
            resumed: opts.resume,
            throughput_bytes_per_sec: (bytes_read as f64 / duration.as_secs_f64().max(1e-9)) as u64,
        },
    ))
}

/// Threads that check the chunk checksums.
const CHECK_THREADS: usize = 2;

/// What [`load_target`] built: the target, its memory, pages and bytes loaded, and the page
/// hashes when loaded through userfaultfd (else the memory must be digested).
type LoadedTarget<T> = (T, Vec<RegionMemory>, u64, u64, Option<Vec<DigestTable>>);

/// Build the target and load the chain's memory into it, nothing resumed: through
/// userfaultfd when the memory allows ([`lazy::load_all`](crate::lazy::load_all): no page
/// zero-filled before it is overwritten, holes never touched), else with `read` into it.
fn load_target<T, F>(
    chain: &Chain,
    make_target: F,
    opts: &RestoreOptions,
) -> Result<LoadedTarget<T>, SnapshotError>
where
    T: MigrationTarget,
    F: FnOnce(&StreamHeader) -> Result<T, VmError>,
{
    let target = make_target(chain.header()).map_err(SnapshotError::vm("create the target VM"))?;
    let mems = target_memory(&target, chain.header())?;
    let page = u64::from(chain.header().page_size());
    if let Some(l) = crate::lazy::load_all(chain, &mems, page, opts.progress.as_ref())? {
        return Ok((target, mems, l.data_pages, l.bytes_read, Some(l.tables)));
    }
    let mut runs = Vec::new();
    for i in 0..mems.len() {
        for m in 0..chain.members().len() {
            for (first, n) in chain.data_runs(m, i) {
                runs.push((i, m, first, n));
            }
        }
    }
    let total: u64 = runs.iter().map(|r| r.3 * page).sum();
    let mut done = 0u64;
    for &(i, m, first, n) in &runs {
        let path = chain.members()[m].join(mem_file(i));
        let file = chain.file(m, i);
        let mem = mems[i];
        // In pieces, for progress.
        let piece = (4u64 << 20) / page;
        let mut p = first;
        while p < first + n {
            let k = piece.max(1).min(first + n - p);
            let (off, len) = ((p * page) as usize, (k * page) as usize);
            // SAFETY: `off..off + len` is inside the region's mapping (the runs are pages of
            // the region, whose size `target_memory` checked), which the target keeps valid;
            // nobody but this restore touches the target's memory before it is resumed (the
            // `MigrationTarget` memory contract), so this exclusive slice aliases nothing
            // for its short life.
            let dst = unsafe { std::slice::from_raw_parts_mut(mem.as_ptr().add(off), len) };
            file.read_exact_at(dst, p * page)
                .map_err(|e| SnapshotError::io("read", &path, e))?;
            p += k;
            done += len as u64;
            if let Some(f) = &opts.progress {
                f(Progress {
                    phase: "restore",
                    done_bytes: done,
                    total_bytes: total,
                });
            }
        }
    }
    Ok((target, mems, total / page, total, None))
}
