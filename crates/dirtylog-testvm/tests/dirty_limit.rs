//! The dirty limit (QEMU's dirty-limit) on a real KVM guest: with the ring tracker, a limit
//! slows the vCPUs that dirty faster than it, one by one, from their rings' rates; lifting it
//! gives them their speed back; a bitmap tracker cannot limit. Rates are compared with the
//! free rate measured in the same test, never with absolute numbers. Needs `/dev/kvm` (fails,
//! never skips, without it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dirtylog_migrate::{DirtyTracker, MigrationMemory, TrackerKind, Unsupported, Vcpus};
use dirtylog_testvm::kernels;
use dirtylog_testvm::migrate::{GuestConfig, KvmSource};
use dirtylog_testvm::pc::{self, Pc, PcConfig};

/// One KVM test at a time: guests of concurrent tests would share the 2 cores.
fn kvm() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: these tests need KVM; they fail rather than skip"
    );
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two vCPUs dirtying as fast as they run, each sweeping 32 MiB (more pages than the ring
/// holds, so that a host pushing one entry per page keeps pushing).
fn guest(tracker: TrackerKind) -> GuestConfig {
    GuestConfig {
        mem_bytes: 128 << 20,
        vcpus: 2,
        dirty_rate: None,
        working_set_bytes: 64 << 20,
        random: false,
        mailbox_every: 0,
        tracker,
        seed: 3,
        huge_pages: true,
        program: dirtylog_testvm::Program::DeviceDirtier,
    }
}

/// Each vCPU's ring entries per second over `d`, from `pushed` (per-vCPU wrapping counts).
fn rates_of(pushed: impl Fn() -> Vec<u32>, vcpus: usize, d: Duration) -> Vec<f64> {
    let (a, t0) = (pushed(), Instant::now());
    std::thread::sleep(d);
    let (b, t1) = (pushed(), Instant::now());
    assert_eq!(a.len(), vcpus, "one ring per vCPU");
    let secs = t1.duration_since(t0).as_secs_f64();
    a.iter()
        .zip(&b)
        .map(|(a, b)| f64::from(b.wrapping_sub(*a)) / secs)
        .collect()
}

/// Run `body` while a thread harvests every region of `vm` every 5 ms, as a migration would:
/// PVM may take a vCPU's ring-full exit at any time (late or not at all, see the runner), and a
/// vCPU parked on a full ring that nobody resets dirties nothing, limit or not (seen in CI:
/// 0 entries/s under the limit).
fn harvesting<V, R>(vm: &V, body: impl FnOnce() -> R) -> R
where
    V: DirtyTracker + MigrationMemory + Sync,
{
    let page = u64::from(vm.page_size());
    let mut bits: Vec<Vec<u64>> = vm
        .regions()
        .iter()
        .map(|r| vec![0u64; (r.size / page).div_ceil(64) as usize])
        .collect();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for (i, words) in bits.iter_mut().enumerate() {
                    vm.harvest(i, words).expect("harvest");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = body();
        stop.store(true, Ordering::Relaxed);
        r
    })
}

fn ring_rates(src: &KvmSource, d: Duration) -> Vec<f64> {
    rates_of(|| src.dirty_ring_pushed(), 2, d)
}

#[test]
fn a_limit_slows_the_fast_vcpus_and_lifting_it_restores_them() {
    let _k = kvm();
    let src = KvmSource::boot(&guest(TrackerKind::Ring { entries: 4096 })).expect("boot");
    DirtyTracker::start(&src).expect("start tracking");
    harvesting(&src, || limits_on_a_test_guest(&src));
    src.stop().expect("stop tracking");
    src.shutdown().expect("no vCPU failed");
}

fn limits_on_a_test_guest(src: &KvmSource) {
    std::thread::sleep(Duration::from_millis(300));

    let free = ring_rates(src, Duration::from_secs(1));
    assert!(
        free.iter().all(|&r| r > 100.0),
        "both vCPUs dirty freely: {free:?} entries/s"
    );
    let slowest = free.iter().copied().fold(f64::INFINITY, f64::min);

    // A limit far above the free rate touches nobody.
    src.set_dirty_limit(Some((slowest * 10.0) as u64))
        .expect("set a high limit");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        src.dirty_limit_throttle(),
        vec![0, 0],
        "vCPUs under the limit are not throttled"
    );

    // A tenth of the slower vCPU's free rate.
    let limit = (slowest / 10.0) as u64;
    src.set_dirty_limit(Some(limit)).expect("set the limit");
    std::thread::sleep(Duration::from_millis(1000));
    let limited = ring_rates(src, Duration::from_secs(1));
    let throttle = src.dirty_limit_throttle();
    let measured = src.dirty_limit_rates();
    eprintln!(
        "free {free:.0?} entries/s; limit {limit}: {limited:.0?} entries/s \
         (controller: {measured:?}, throttle {throttle:?}%)"
    );
    for (i, (l, f)) in limited.iter().zip(&free).enumerate() {
        assert!(
            *l < 0.5 * f,
            "vCPU {i} under a limit of 10% of its free rate dirtied {l:.0}/s, free {f:.0}/s"
        );
    }
    assert!(
        limited.iter().all(|&r| r > 0.0),
        "the limited vCPUs still run: {limited:?}"
    );
    assert_eq!(throttle.len(), 2);
    assert!(
        throttle.iter().all(|&p| p > 0),
        "both fast vCPUs are throttled: {throttle:?}"
    );
    assert_eq!(measured.len(), 2, "the controller reports a rate per vCPU");

    // Lifted: full speed again, and nothing reported.
    src.set_dirty_limit(None).expect("lift the limit");
    assert!(src.dirty_limit_throttle().is_empty());
    assert!(src.dirty_limit_rates().is_empty());
    std::thread::sleep(Duration::from_millis(200));
    let again = ring_rates(src, Duration::from_secs(1));
    eprintln!("lifted: {again:.0?} entries/s");
    // Against the limited rate of the same vCPU (about a tenth of its free rate), and the
    // total against the free total (the two vCPUs share two busy cores: one's loss may be
    // the other's gain).
    for (i, (a, l)) in again.iter().zip(&limited).enumerate() {
        assert!(
            *a > 3.0 * l,
            "vCPU {i} after the limit was lifted dirtied {a:.0}/s, under it {l:.0}/s"
        );
    }
    let (again_sum, free_sum) = (again.iter().sum::<f64>(), free.iter().sum::<f64>());
    assert!(
        again_sum > 0.4 * free_sum,
        "after the limit was lifted the vCPUs dirtied {again_sum:.0}/s in all, free {free_sum:.0}/s"
    );

    // A limit of 0 would stop the guest: refused.
    assert!(src.set_dirty_limit(Some(0)).is_err());
}

#[test]
fn a_bitmap_tracker_cannot_limit() {
    let _k = kvm();
    let mut cfg = guest(TrackerKind::ClearLog);
    cfg.mem_bytes = 16 << 20;
    cfg.working_set_bytes = 1 << 20;
    let src = KvmSource::boot(&cfg).expect("boot");
    DirtyTracker::start(&src).expect("start tracking");
    let e = src
        .set_dirty_limit(Some(1000))
        .expect_err("a dirty limit needs the ring");
    assert!(
        e.downcast_ref::<Unsupported>().is_some(),
        "Unsupported, so the engine goes on: {e}"
    );
    assert!(
        e.to_string().contains("--tracker ring"),
        "says what to do: {e}"
    );
    assert!(src.dirty_limit_throttle().is_empty());
    // Lifting a limit never set is fine.
    src.set_dirty_limit(None).expect("nothing to lift");
    src.stop().expect("stop tracking");
    src.shutdown().expect("no vCPU failed");
}

/// The PC (a Multiboot kernel's VM) limits the same way: the `spin` kernel writing a dword per
/// page of 16 MiB for ever on one vCPU.
#[test]
fn a_pc_is_limited_too() {
    let _k = kvm();
    let cfg = PcConfig {
        mem_bytes: 64 << 20,
        smp: 1,
        tracker: TrackerKind::Ring { entries: 4096 },
        huge_pages: true,
    };
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    let console: pc::Console = Arc::new(move |b| {
        sink.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    });
    let log: pc::Log = Arc::new(|m: &str| eprintln!("pc: {m}"));
    let pc = Pc::new(&cfg, console, log).expect("build the PC");
    let spin = kernels::by_name("spin").expect("the spin kernel");
    pc.boot(spin.elf, "spin.elf mb=16", None)
        .expect("boot spin");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).contains("spin")
    {
        assert!(Instant::now() < deadline, "spin never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    DirtyTracker::start(&pc).expect("start tracking");
    harvesting(&pc, || {
        std::thread::sleep(Duration::from_millis(200));
        let rates = |d| rates_of(|| pc.dirty_ring_pushed(), 1, d);
        let free = rates(Duration::from_secs(1))[0];
        assert!(free > 100.0, "spin dirties freely: {free:.0} entries/s");
        let limit = (free / 10.0) as u64;
        pc.set_dirty_limit(Some(limit)).expect("set the limit");
        std::thread::sleep(Duration::from_millis(1000));
        let limited = rates(Duration::from_secs(1))[0];
        eprintln!(
            "pc: free {free:.0} entries/s; limit {limit}: {limited:.0} entries/s (throttle {:?}%)",
            pc.dirty_limit_throttle()
        );
        assert!(
            limited < 0.5 * free && limited > 0.0,
            "under a limit of 10% of its free rate spin dirtied {limited:.0}/s, free {free:.0}/s"
        );
        pc.set_dirty_limit(None).expect("lift the limit");
        std::thread::sleep(Duration::from_millis(200));
        let again = rates(Duration::from_secs(1))[0];
        assert!(
            again > 3.0 * limited,
            "lifted, spin dirtied {again:.0}/s; under the limit {limited:.0}/s"
        );
    });
    DirtyTracker::stop(&pc).expect("stop tracking");
    pc.shutdown().expect("no vCPU failed");
}
