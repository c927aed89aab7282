//! Pause and resume latency of 2 vCPUs in a tight write loop that never exits on its own.
//!
//! 100 times: time from the `Runner::pause` call until every vCPU is parked out of `KVM_RUN`,
//! then resume, time until every vCPU is back in the guest (its write counter moves), and let
//! them run about 5 ms. Prints the median and worst of each, in µs.
//!
//! ```text
//! cargo run --release -p dirtylog-testvm --example pause_latency
//! ```

use std::time::{Duration, Instant};

use dirtylog::TrackerKind;
use dirtylog_testvm::{Machine, MachineConfig, MemoryOptions, Program};

const ROUNDS: usize = 100;
const T: Duration = Duration::from_secs(10);

fn summary(name: &str, mut us: Vec<f64>) {
    us.sort_by(f64::total_cmp);
    let median = us[us.len() / 2];
    let worst = us[us.len() - 1];
    println!(
        "{name:<28} median {median:>8.1} µs   worst {worst:>8.1} µs   ({} samples)",
        us.len()
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let m = Machine::new(MachineConfig {
        vcpus: 2,
        program: Program::TightLoop,
        slot_pages: vec![512],
        log_dirty_pages: true,
        tracker: TrackerKind::DirtyLog,
        initially_set: true,
        memory: MemoryOptions::default(),
        seed: 1,
    })?;
    let runner = m.runner();
    m.resume(false, T)?;
    std::thread::sleep(Duration::from_millis(20));
    let (mut pause_us, mut resume_us) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        runner.pause(T)?;
        pause_us.push(t.elapsed().as_secs_f64() * 1e6);
        let before: Vec<u64> = (0..2).map(|i| m.writes(i)).collect();
        let t = Instant::now();
        runner.resume();
        // Running again: both write counters moved.
        while (0..2).any(|i| m.writes(i) == before[i as usize]) {
            if t.elapsed() > T {
                return Err("the vCPUs did not run after the resume".into());
            }
            // Sleep, not spin: on a 2-core host a spinning main thread takes a core from the
            // vCPUs it waits for.
            std::thread::sleep(Duration::from_micros(20));
        }
        resume_us.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "2 vCPUs in a tight write loop, {ROUNDS} rounds, {} kicks sent",
        runner.kicks()
    );
    summary("pause (call to all parked)", pause_us);
    summary("resume (call to all writing)", resume_us);
    m.shutdown()?;
    Ok(())
}
