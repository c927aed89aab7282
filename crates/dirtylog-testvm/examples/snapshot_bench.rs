//! Snapshot benchmark (issue 12) on a KVM test guest: 1 GiB of guest memory, a 64 MiB working
//! set, 2 vCPUs. Each iteration, in an order that rotates from one iteration to the next:
//!
//! - `disk`: the baseline — write a 1 GiB file of non-zero data in 4 MiB `pwrite`s to the
//!   benchmark's directory, `fsync` it (the disk's sequential write speed), rewrite it in
//!   place and `fsync` again (the device without the page cache's first touches), read it
//!   back (the page cache's read speed), delete it.
//! - per mode (`stop`, `live`, `background`): a full member, then after `--diff-ms` a diff,
//!   into a fresh chain; the full member's write throughput (bytes written / duration) is
//!   compared with the disk's, the diff's duration with the time the disk takes to write its
//!   bytes; the guest pause of each. `CreateConfig::verify_source` is off (it digests all
//!   guest memory in every pause; the restore still checks the digest).
//! - restore of the last chain, `eager` and `lazy` in alternating order: time to the guest's
//!   first instruction (resume) and until every page is loaded.
//! - `qemu` (with `--qemu SCRIPT`): `python3 SCRIPT` — QEMU saving the peer guest with
//!   `migrate` to `exec:cat > FILE`; its JSON line is printed and its numbers collected.
//!
//! Every chain is deleted after its iteration. Medians over the iterations are printed at the
//! end, each ratio taken between medians of the whole run (a member's throughput against the
//! baseline's), with its target.
//!
//! ```text
//! cargo run --release -p dirtylog-testvm --example snapshot_bench -- \
//!     [--iters 5] [--dir /var/tmp] [--mem-mib 1024] [--ws-mib 64] [--diff-ms 1000] \
//!     [--fill] [--qemu bench/qemu_save.py]
//! ```
//!
//! `--fill` writes a non-zero pattern into the guest memory outside the working set before
//! the snapshots (from the host, before tracking starts), so that a full member writes all
//! 1 GiB: a throughput test at the disk's scale. Without it, the untouched memory is zero
//! and costs nothing on disk (as for QEMU, whose stream sends a zero page as a flag).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dirtylog::TrackerKind;
use std::sync::Arc;

use dirtylog_migrate::wire::StreamHeader;
use dirtylog_migrate::{MigrationMemory, MigrationSource, MigrationTarget, VmError};
use dirtylog_snapshot::{restore, CreateConfig, RestoreOptions, SnapshotMode, Snapshotter};
use dirtylog_testvm::migrate::{GuestConfig, KvmSource, KvmTarget, TargetOptions};
use dirtylog_testvm::pc::{Console, Log, Pc, PcConfig};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    iters: usize,
    dir: PathBuf,
    mem_mib: u64,
    ws_mib: u64,
    diff_ms: u64,
    fill: bool,
    qemu: Option<PathBuf>,
    /// The peer kernel (a Multiboot ELF) to run on the minimal PC instead of the built-in guest.
    kernel: Option<PathBuf>,
    /// Which tasks to run (0 disk, 1 stop, 2 live, 3 background, 4 restores, 5 qemu).
    tasks: Vec<usize>,
}

fn args() -> Res<Args> {
    let mut a = Args {
        iters: 5,
        dir: PathBuf::from("/var/tmp"),
        mem_mib: 1024,
        ws_mib: 64,
        diff_ms: 1000,
        fill: false,
        qemu: None,
        kernel: None,
        tasks: (0..6).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--iters" => a.iters = v()?.parse()?,
            "--dir" => a.dir = v()?.into(),
            "--mem-mib" => a.mem_mib = v()?.parse()?,
            "--ws-mib" => a.ws_mib = v()?.parse()?,
            "--diff-ms" => a.diff_ms = v()?.parse()?,
            "--fill" => a.fill = true,
            "--qemu" => a.qemu = Some(v()?.into()),
            "--kernel" => a.kernel = Some(v()?.into()),
            "--tasks" => a.tasks = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--bench" => {}
            _ => return Err(format!("unknown argument {k}").into()),
        }
    }
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    Ok(a)
}

/// Write `bytes` of non-zero data to a new file in `dir`, fsync; rewrite it in place, fsync;
/// read it back (from the page cache); delete.
fn disk_write_speed(dir: &Path, bytes: u64) -> Res<Disk> {
    let path = dir.join(format!(".disk-baseline-{}", std::process::id()));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf: Vec<u8> = (0..(4usize << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let t = Instant::now();
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    let write_secs = t.elapsed().as_secs_f64();
    f.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  disk baseline: pwrite {:.0} ms + fsync {:.0} ms",
        write_secs * 1e3,
        (secs - write_secs) * 1e3
    );
    // Again over the same file, whose pages are now in the page cache: the device's speed
    // without the cost of the page cache's first touch of fresh memory.
    for b in buf.iter_mut() {
        *b = b.wrapping_add(1) | 1;
    }
    let t = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    let rewrite_secs = t.elapsed().as_secs_f64();
    drop(f);
    // Read it back from the page cache: what a restore right after a snapshot reads from.
    let f = File::open(&path)?;
    let mut rbuf = vec![0u8; buf.len()];
    let t = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(rbuf.len() as u64) as usize;
        f.read_exact_at(&mut rbuf[..n], off)?;
        off += n as u64;
    }
    let read_secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(Disk {
        write: bytes as f64 / secs,
        rewrite: bytes as f64 / rewrite_secs,
        read: bytes as f64 / read_secs,
    })
}

/// The baselines, bytes per second.
struct Disk {
    /// A new 1 GiB file written and fsynced.
    write: f64,
    /// The same file rewritten in place and fsynced.
    rewrite: f64,
    /// The file read back from the page cache.
    read: f64,
}

/// Measurements of one quantity over the iterations.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, x: f64) {
        self.0.push(x);
    }
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    }
}

#[derive(Default)]
struct ModeSamples {
    full_ms: Samples,
    full_bytes: Samples,
    /// Bytes written per second.
    full_bps: Samples,
    full_pause_ms: Samples,
    diff_ms: Samples,
    diff_bytes: Samples,
    /// Milliseconds per byte written.
    diff_ms_per_byte: Samples,
    diff_pause_ms: Samples,
}

#[derive(Default)]
struct RestoreSamples {
    resume_ms: Samples,
    loaded_ms: Samples,
    bytes: Samples,
}

#[derive(Default)]
struct QemuSamples {
    save_ms: Samples,
    bytes: Samples,
    downtime_ms: Samples,
    file_bytes: Samples,
}

const MODES: [SnapshotMode; 3] = [
    SnapshotMode::Stop,
    SnapshotMode::Live,
    SnapshotMode::Background,
];

fn mib(b: f64) -> f64 {
    b / f64::from(1u32 << 20)
}

fn fill(src: &KvmSource, skip: u64) {
    // The guest memory slot (region 1): its working set is at its start.
    let Some(m) = src.region_memory(1) else {
        return;
    };
    let len = m.len() as u64;
    let mut off = skip;
    while off + 4096 <= len {
        // Dense data (every word of the page non-zero and varying), like the disk baseline's.
        let mut x = off | 1;
        for w in 0..512u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // SAFETY: `off + 8w..off + 8w + 8` is inside the region's live mapping (off + 4096
            // <= len); the guest never touches memory outside its working set (the first
            // `skip` bytes), so nothing races this write.
            unsafe {
                std::ptr::write_unaligned(m.as_ptr().add((off + 8 * w) as usize).cast::<u64>(), x);
            }
        }
        off += 4096;
    }
}

fn snapshot_mode<S: MigrationSource>(
    src: &S,
    dir: &Path,
    mode: SnapshotMode,
    diff_ms: u64,
    disk_bps: f64,
    s: &mut ModeSamples,
) -> Res<PathBuf> {
    let chain = dir.join(format!("chain-{mode}"));
    let _ = std::fs::remove_dir_all(&chain);
    let cfg = CreateConfig {
        mode,
        verify_source: false,
        ..Default::default()
    };
    let mut snap = Snapshotter::new(src, &chain, None)?;
    let full = snap.take(&cfg)?;
    std::thread::sleep(Duration::from_millis(diff_ms));
    let diff = snap.take(&cfg)?;
    snap.finish()?;
    let full_ms = full.duration.as_secs_f64() * 1e3;
    let full_bps = full.bytes_written as f64 / full.duration.as_secs_f64();
    let diff_ms = diff.duration.as_secs_f64() * 1e3;
    let diff_disk_ms = diff.bytes_written as f64 / disk_bps * 1e3;
    println!(
        "  {mode:<10} full: {:>7.1} MiB in {full_ms:>7.1} ms = {:>6.1} MiB/s ({:.2}x the disk so far), pause {:>7.2} ms | diff: {:>6.1} MiB ({} pages) in {diff_ms:>6.1} ms, disk would take {diff_disk_ms:>6.1} ms ({:.2}x), pause {:>6.2} ms",
        mib(full.bytes_written as f64),
        mib(full_bps),
        full_bps / disk_bps,
        full.pause.as_secs_f64() * 1e3,
        mib(diff.bytes_written as f64),
        diff.pages,
        diff_ms / diff_disk_ms,
        diff.pause.as_secs_f64() * 1e3,
    );
    s.full_ms.push(full_ms);
    s.full_bytes.push(full.bytes_written as f64);
    s.full_bps.push(full_bps);
    s.full_pause_ms.push(full.pause.as_secs_f64() * 1e3);
    s.diff_ms.push(diff_ms);
    s.diff_bytes.push(diff.bytes_written as f64);
    s.diff_ms_per_byte
        .push(diff_ms / diff.bytes_written.max(1) as f64);
    s.diff_pause_ms.push(diff.pause.as_secs_f64() * 1e3);
    Ok(diff.path)
}

/// How the bench builds a restore target, reads its progress and stops it.
trait Guest {
    type Target: MigrationTarget;
    fn target(&self, h: &StreamHeader) -> Result<Self::Target, VmError>;
    fn progress(t: &Self::Target) -> u64;
    fn stop(t: Self::Target) -> Res<()>;
}

struct Builtin;

impl Guest for Builtin {
    type Target = KvmTarget;
    fn target(&self, h: &StreamHeader) -> Result<KvmTarget, VmError> {
        KvmTarget::new(
            h,
            &TargetOptions {
                huge_pages: true,
                start_paused: false,
            },
        )
    }
    fn progress(t: &KvmTarget) -> u64 {
        t.guest_writes()
    }
    fn stop(t: KvmTarget) -> Res<()> {
        t.check()?;
        t.shutdown()
    }
}

struct Peer;

fn quiet() -> (Console, Log) {
    (
        Arc::new(|_: u8| {}),
        Arc::new(|m: &str| eprintln!("PC: {m}")),
    )
}

impl Guest for Peer {
    type Target = Pc;
    fn target(&self, h: &StreamHeader) -> Result<Pc, VmError> {
        let (c, l) = quiet();
        Pc::for_stream(h, TrackerKind::ClearLog, true, c, l)
    }
    fn progress(t: &Pc) -> u64 {
        t.serial_bytes()
    }
    fn stop(t: Pc) -> Res<()> {
        t.shutdown()
    }
}

fn restore_once<G: Guest>(g: &G, tip: &Path, lazy: bool, s: &mut RestoreSamples) -> Res<()> {
    let opts = RestoreOptions {
        lazy,
        ..Default::default()
    };
    let (t, st) = restore(tip, |h| g.target(h), &opts)?;
    // The restored guest runs on: check that it makes progress.
    let w0 = G::progress(&t);
    std::thread::sleep(Duration::from_millis(100));
    let w1 = G::progress(&t);
    G::stop(t)?;
    if w1 <= w0 {
        return Err(format!("the restored guest made no progress ({w0} -> {w1} writes)").into());
    }
    let name = if lazy { "lazy" } else { "eager" };
    println!(
        "  restore {name:<5}: first instruction after {:>7.2} ms, fully loaded after {:>7.1} ms ({:.1} MiB read, check {:.1} ms); guest progress +{} in 100 ms",
        st.time_to_resume.as_secs_f64() * 1e3,
        st.duration.as_secs_f64() * 1e3,
        mib(st.bytes_read as f64),
        st.check.as_secs_f64() * 1e3,
        w1 - w0
    );
    s.resume_ms.push(st.time_to_resume.as_secs_f64() * 1e3);
    s.loaded_ms.push(st.duration.as_secs_f64() * 1e3);
    s.bytes.push(st.bytes_read as f64);
    Ok(())
}

fn qemu_once(script: &Path, dir: &Path, s: &mut QemuSamples) -> Res<()> {
    let out = Command::new("python3")
        .arg(script)
        .arg("--dir")
        .arg(dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            format!(
                "qemu script: no JSON line (status {}); stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    println!("  qemu: {line}");
    let get = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    s.save_ms
        .push(get("save_ms").ok_or("qemu script: no save_ms")?);
    s.bytes.push(get("total_bytes").unwrap_or(f64::NAN));
    s.downtime_ms.push(get("downtime_ms").unwrap_or(f64::NAN));
    s.file_bytes.push(get("file_bytes").unwrap_or(f64::NAN));
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn main() -> Res<()> {
    let a = args()?;
    let dir = a
        .dir
        .join(format!("dirtylog-snapbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(a: &Args, dir: &Path) -> Res<()> {
    let mem = a.mem_mib << 20;
    if let Some(kernel) = &a.kernel {
        let image = std::fs::read(kernel)?;
        let (c, l) = quiet();
        let src = Pc::new(
            &PcConfig {
                mem_bytes: mem,
                smp: 1,
                tracker: TrackerKind::ClearLog,
                huge_pages: true,
            },
            c,
            l,
        )?;
        src.boot(&image, &kernel.display().to_string(), None)?;
        println!(
            "snapshot bench: peer kernel {} on the minimal PC, {} MiB, 1 vCPU, clear-log, dir {}, {} iterations",
            kernel.display(),
            a.mem_mib,
            dir.display(),
            a.iters
        );
        std::thread::sleep(Duration::from_millis(2000));
        let b0 = src.serial_bytes();
        std::thread::sleep(Duration::from_millis(1000));
        let passes = src.serial_bytes() - b0;
        println!(
            "peer guest: {passes} passes/s over its working set = {} MiB/s dirtied",
            passes * a.ws_mib
        );
        if let Some(e) = src.exit() {
            return Err(format!("the peer guest ended: {e:?}").into());
        }
        let r = bench(a, dir, &src, &Peer);
        src.shutdown()?;
        return r;
    }
    let cfg = GuestConfig {
        mem_bytes: mem,
        vcpus: 2,
        working_set_bytes: a.ws_mib << 20,
        tracker: TrackerKind::ClearLog,
        huge_pages: true,
        ..Default::default()
    };
    println!(
        "snapshot bench: built-in guest {} MiB, working set {} MiB, 2 vCPUs, dirty rate {:?} pages/s/vCPU, clear-log, fill={}, dir {}, {} iterations",
        a.mem_mib,
        a.ws_mib,
        cfg.dirty_rate,
        a.fill,
        dir.display(),
        a.iters
    );
    let src = KvmSource::boot(&cfg)?;
    if a.fill {
        fill(&src, (a.ws_mib + 1) << 20);
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = bench(a, dir, &src, &Builtin);
    src.shutdown()?;
    r
}

fn bench<S: MigrationSource, G: Guest>(a: &Args, dir: &Path, src: &S, g: &G) -> Res<()> {
    let mem = a.mem_mib << 20;
    let mut disk = Samples::default();
    let mut cache = Samples::default();
    let mut rewrite = Samples::default();
    let mut modes: Vec<ModeSamples> = MODES.iter().map(|_| ModeSamples::default()).collect();
    let mut eager = RestoreSamples::default();
    let mut lazy = RestoreSamples::default();
    let mut qemu = QemuSamples::default();
    // Tasks: 0 disk, 1..=3 modes, 4 restores (of the chain of the last mode run), 5 qemu.
    let ntasks = if a.qemu.is_some() { 6 } else { 5 };
    for it in 0..a.iters {
        println!("iteration {}:", it + 1);
        let mut disk_bps = disk.median();
        let mut last_tip: Option<PathBuf> = None;
        for k in 0..ntasks {
            let task = (k + it) % ntasks;
            if !a.tasks.contains(&task) {
                continue;
            }
            match task {
                0 => {
                    let dk = disk_write_speed(dir, mem)?;
                    println!(
                        "  disk: {} MiB written + fsync at {:.1} MiB/s, rewritten + fsync at {:.1} MiB/s, read back (page cache) at {:.1} MiB/s",
                        a.mem_mib,
                        mib(dk.write),
                        mib(dk.rewrite),
                        mib(dk.read)
                    );
                    disk.push(dk.write);
                    rewrite.push(dk.rewrite);
                    cache.push(dk.read);
                    disk_bps = disk.median();
                }
                1..=3 => {
                    if disk_bps.is_nan() {
                        let dk = disk_write_speed(dir, mem)?;
                        disk_bps = dk.write;
                        disk.push(dk.write);
                        rewrite.push(dk.rewrite);
                        cache.push(dk.read);
                    }
                    let m = task - 1;
                    if let Some(t) = last_tip.take() {
                        let _ = std::fs::remove_dir_all(t.parent().unwrap_or(&t));
                    }
                    last_tip = Some(snapshot_mode(
                        src,
                        dir,
                        MODES[m],
                        a.diff_ms,
                        disk_bps,
                        &mut modes[m],
                    )?);
                }
                4 => {
                    let tip = match &last_tip {
                        Some(t) => t.clone(),
                        None => {
                            if disk_bps.is_nan() {
                                let dk = disk_write_speed(dir, mem)?;
                                disk_bps = dk.write;
                                disk.push(dk.write);
                                rewrite.push(dk.rewrite);
                                cache.push(dk.read);
                            }
                            // A chain to restore, not counted among the modes' samples.
                            let m = it % MODES.len();
                            let t = snapshot_mode(
                                src,
                                dir,
                                MODES[m],
                                a.diff_ms,
                                disk_bps,
                                &mut ModeSamples::default(),
                            )?;
                            last_tip = Some(t.clone());
                            t
                        }
                    };
                    let order = if it % 2 == 0 {
                        [false, true]
                    } else {
                        [true, false]
                    };
                    for l in order {
                        restore_once(g, &tip, l, if l { &mut lazy } else { &mut eager })?;
                    }
                }
                _ => {
                    if let Some(script) = &a.qemu {
                        qemu_once(script, dir, &mut qemu)?;
                    }
                }
            }
        }
        if let Some(t) = last_tip.take() {
            let _ = std::fs::remove_dir_all(t.parent().unwrap_or(&t));
        }
    }
    let d = disk.median();
    println!("\nmedians over {} iterations (verify_source off):", a.iters);
    println!(
        "disk sequential write (new 1 GiB file + fsync): {:.1} MiB/s; rewritten in place + fsync: {:.1} MiB/s",
        mib(d),
        mib(rewrite.median())
    );
    for (m, s) in MODES.iter().zip(&modes) {
        // Against the baselines' medians over the whole run.
        let fr = s.full_bps.median() / d;
        let fr2 = s.full_bps.median() / rewrite.median();
        let dr = s.diff_ms_per_byte.median() * d / 1e3;
        println!(
            "{m:<10} full {:>7.1} MiB in {:>7.1} ms: {:.2}x disk (target >= 0.8: {}; {:.2}x the rewrite speed); pause {:.2} ms | diff {:.1} MiB in {:.1} ms: {:.2}x the disk's time (target <= 1.2: {}); pause {:.2} ms{}",
            mib(s.full_bytes.median()),
            s.full_ms.median(),
            fr,
            verdict(fr >= 0.8),
            fr2,
            s.full_pause_ms.median(),
            mib(s.diff_bytes.median()),
            s.diff_ms.median(),
            dr,
            verdict(dr <= 1.2),
            s.diff_pause_ms.median(),
            if *m == SnapshotMode::Background {
                format!(
                    " (background pause target <= 10 ms + vCPU state: full {}, diff {})",
                    verdict(s.full_pause_ms.median() <= 10.0),
                    verdict(s.diff_pause_ms.median() <= 10.0)
                )
            } else {
                String::new()
            }
        );
    }
    println!(
        "page cache read of the 1 GiB file: {:.1} MiB/s",
        mib(cache.median())
    );
    let eb = eager.bytes.median();
    println!(
        "restore eager: first instruction {:.1} ms, fully loaded {:.1} ms ({:.1} MiB read; reading that from the page cache takes {:.1} ms: {:.2}x)",
        eager.resume_ms.median(),
        eager.loaded_ms.median(),
        mib(eb),
        eb / cache.median() * 1e3,
        eager.loaded_ms.median() / (eb / cache.median() * 1e3)
    );
    println!(
        "restore lazy:  first instruction {:.2} ms (target <= 50 ms: {}), fully loaded {:.1} ms; eager/lazy time to first instruction {:.1}x",
        lazy.resume_ms.median(),
        verdict(lazy.resume_ms.median() <= 50.0),
        lazy.loaded_ms.median(),
        eager.resume_ms.median() / lazy.resume_ms.median()
    );
    if a.qemu.is_some() {
        println!(
            "qemu migrate to exec:cat: save {:.1} ms, {:.1} MiB transferred (file {:.1} MiB), downtime {:.1} ms",
            qemu.save_ms.median(),
            mib(qemu.bytes.median()),
            mib(qemu.file_bytes.median()),
            qemu.downtime_ms.median()
        );
    }
    Ok(())
}
