//! Where a PC migration's blackout goes, step by step, without the stream: pause, vCPU state
//! save, device save, restore into a fresh PC, resume. Medians of 20 rounds.
//! `cargo run --release -p dirtylog-testvm --example pc_blackout [KERNEL] [SMP]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use dirtylog::TrackerKind;
use dirtylog_migrate::{DeviceState, VcpuRestore, Vcpus};
use dirtylog_testvm::kernels;
use dirtylog_testvm::pc::{self, Pc, PcConfig};

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() -> Result<(), dirtylog_migrate::VmError> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("spin", String::as_str);
    let smp: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let kernel = kernels::by_name(name)
        .ok_or_else(|| dirtylog_migrate::VmError::from("no such kernel".to_string()))?;
    let cfg = PcConfig {
        mem_bytes: 16 << 20,
        smp,
        tracker: TrackerKind::ClearLog,
        huge_pages: true,
    };
    let console: pc::Console = Arc::new(|_| {});
    let log: pc::Log = Arc::new(|m: &str| eprintln!("pc: {m}"));
    let mut src = Pc::new(&cfg, console.clone(), log.clone())?;
    src.boot(kernel.elf, &format!("{name}.elf mb=2"), None)?;
    std::thread::sleep(Duration::from_millis(200));
    let mut t: [Vec<Duration>; 7] = Default::default();
    for _ in 0..20 {
        let dst = Pc::new(&cfg, console.clone(), log.clone())?;
        let t0 = Instant::now();
        Vcpus::pause(&src)?;
        let t1 = Instant::now();
        let vcpus = Vcpus::save_state(&src)?;
        let t2 = Instant::now();
        let devices = src.save_devices()?;
        let t3 = Instant::now();
        for (i, b) in vcpus.iter().enumerate() {
            dst.restore_state(i as u32, b)?;
        }
        let t4 = Instant::now();
        for d in &devices {
            dst.restore_device(d.name(), d.version(), d.bytes())?;
        }
        let t5 = Instant::now();
        VcpuRestore::resume(&dst)?;
        let t6 = Instant::now();
        for (i, (a, b)) in [t0, t1, t2, t3, t4, t5]
            .iter()
            .zip([t1, t2, t3, t4, t5, t6])
            .enumerate()
        {
            t[i].push(b - *a);
        }
        t[6].push(t6 - t0);
        src.shutdown()?;
        src = dst;
        std::thread::sleep(Duration::from_millis(20));
    }
    for (what, v) in [
        "pause",
        "save vCPUs",
        "save devices",
        "restore vCPUs",
        "restore devices",
        "resume",
        "all",
    ]
    .iter()
    .zip(t)
    {
        println!("{what:>16}: {:.3} ms", median(v));
    }
    src.shutdown()?;
    Ok(())
}
