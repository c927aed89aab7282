//! `dirty_log_perf_test` on /dev/kvm with our API against the bare ioctls, plus the guest
//! write rate with logging off.
//!
//! Besides the protocol's wall-clock times, each GET and CLEAR is also timed in CPU time of
//! the calling thread (`CLOCK_THREAD_CPUTIME_ID`: our code and the kernel's work in the ioctl,
//! not the time the thread waited for a CPU), which keeps the ours/bare comparison meaningful
//! on a busy host.
//!
//! ```text
//! cargo run --release -p dirtylog-testvm --example kvm_perf -- [TRACKER]
//!     [--vcpus N] [--mem-mib N] [--iterations N] [--slots N] [--json]
//! ```
//!
//! `TRACKER` is a [`TrackerKind`]: `dirty-log`, `clear-log` (the default), `ring` or
//! `ring:ENTRIES` (the older `get`, `get-clear` and `ring=N` are accepted too).

use std::process::ExitCode;
use std::time::Instant;

use dirtylog::perf::{run, Layer, PerfBackend, PerfConfig};
use dirtylog::selftest::BackendError;
use dirtylog::TrackerKind;
use dirtylog_testvm::KvmPerf;

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid `timespec` for the kernel to fill; no other memory is touched.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A backend that also records the thread CPU time of each GET and CLEAR, by layer.
struct CpuTimed<B> {
    inner: B,
    /// (layer, GET + CLEAR CPU seconds) per iteration.
    samples: Vec<(Layer, f64)>,
}

impl<B: PerfBackend> PerfBackend for CpuTimed<B> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn has_bare(&self) -> bool {
        self.inner.has_bare()
    }
    fn dirty_pass(&mut self, iteration: u64) -> Result<(), BackendError> {
        self.inner.dirty_pass(iteration)
    }
    fn set_logging(&mut self, on: bool) -> Result<(), BackendError> {
        self.inner.set_logging(on)
    }
    fn get(&mut self, layer: Layer) -> Result<u64, BackendError> {
        let t = thread_cpu_s();
        let r = self.inner.get(layer);
        self.samples.push((layer, thread_cpu_s() - t));
        r
    }
    fn clear(&mut self, layer: Layer) -> Result<u64, BackendError> {
        let t = thread_cpu_s();
        let r = self.inner.clear(layer);
        if let Some(s) = self.samples.last_mut() {
            s.1 += thread_cpu_s() - t;
        }
        r
    }
}

fn parse(args: &[String]) -> Result<(PerfConfig, bool), String> {
    let mut cfg = PerfConfig {
        vcpus: 1,
        mem_per_vcpu: 1 << 30,
        iterations: 4,
        slots: 1,
        tracker: TrackerKind::ClearLog,
    };
    let mut json = false;
    let mut it = args.iter();
    let num = |v: Option<&String>, what: &str| -> Result<u64, String> {
        v.ok_or(format!("{what} needs a value"))?
            .parse()
            .map_err(|e| format!("{what}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "get" => cfg.tracker = TrackerKind::DirtyLog,
            "get-clear" => cfg.tracker = TrackerKind::ClearLog,
            s if s.starts_with("ring=") => {
                cfg.tracker = s
                    .replacen('=', ":", 1)
                    .parse()
                    .map_err(|e| format!("{e}"))?
            }
            "--vcpus" => cfg.vcpus = num(it.next(), a)? as u32,
            "--mem-mib" => cfg.mem_per_vcpu = num(it.next(), a)? << 20,
            "--iterations" => cfg.iterations = num(it.next(), a)? as u32,
            "--slots" => cfg.slots = num(it.next(), a)? as u32,
            "--json" => json = true,
            s if !s.starts_with("--") => cfg.tracker = s.parse().map_err(|e| format!("{e}"))?,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok((cfg, json))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cfg, json) = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match measure(&cfg, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn measure(cfg: &PerfConfig, json: bool) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut timed = CpuTimed {
        inner: KvmPerf::new(cfg)?,
        samples: Vec::new(),
    };
    println!("== {}", timed.describe());
    let r = run(&mut timed, cfg, |l| println!("{l}"))?;
    let CpuTimed {
        inner: mut b,
        samples,
    } = timed;
    // Logging is off now. The first pass still faults on pages left write-protected; the
    // second is the plain guest write rate.
    let mut nolog = Vec::new();
    for i in 0..2 {
        let t = Instant::now();
        b.dirty_pass(1000 + i)?;
        nolog.push(t.elapsed().as_secs_f64());
    }
    let pages = cfg.mem_per_vcpu / 4096 * cfg.vcpus as u64;
    let logged: Vec<f64> = r.iterations.iter().map(|it| it.dirty_memory_s).collect();
    let avg_logged = logged.iter().sum::<f64>() / logged.len().max(1) as f64;
    println!(
        "Dirty memory time per pass, logging on: avg {avg_logged:.6}s ({:.0} pages/s)",
        pages as f64 / avg_logged
    );
    println!(
        "Dirty memory time per pass, logging off: {:.6}s, then {:.6}s ({:.0} pages/s)",
        nolog[0],
        nolog[1],
        pages as f64 / nolog[1]
    );
    let median = |l: Layer| {
        let mut v: Vec<f64> = r
            .iterations
            .iter()
            .filter(|it| it.layer == l)
            .map(|it| it.get_s + it.clear_s)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (mo, mb) = (median(Layer::Ours), median(Layer::Bare));
    println!(
        "Median GET+CLEAR per iteration: ours {mo:.6}s, bare {mb:.6}s; ours / bare = {:.3}x",
        mo / mb
    );
    let cpu = |l: Layer| {
        let v: Vec<f64> = samples.iter().filter(|s| s.0 == l).map(|s| s.1).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (co, cb) = (cpu(Layer::Ours), cpu(Layer::Bare));
    println!(
        "Thread CPU time of GET+CLEAR per iteration: ours {co:.6}s, bare {cb:.6}s; ours / bare \
         = {:.3}x",
        co / cb
    );
    if let TrackerKind::Ring { .. } = cfg.tracker {
        // Per entry, in wall-clock and in thread CPU time (samples follow the iterations).
        let per_entry = |l: Layer| {
            let (mut wall, mut cpu, mut n) = (0.0, 0.0, 0u64);
            for (it, s) in r.iterations.iter().zip(&samples) {
                if it.layer == l {
                    wall += it.get_s + it.clear_s;
                    cpu += s.1;
                    n += it.pages;
                }
            }
            let n = n.max(1) as f64;
            (wall / n * 1e9, cpu / n * 1e9, n)
        };
        let ((ow, oc, on), (bw, bc, bn)) = (per_entry(Layer::Ours), per_entry(Layer::Bare));
        println!(
            "Ring harvest+reset per entry: ours {ow:.1} ns ({on} entries), bare {bw:.1} ns ({bn} \
             entries); ours / bare = {:.3}x; in CPU time ours {oc:.1} ns, bare {bc:.1} ns, \
             {:.3}x; {} entries in {} harvests during passes",
            ow / bw,
            oc / bc,
            b.pass_entries(),
            b.pass_harvests()
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    b.shutdown()?;
    Ok(())
}
