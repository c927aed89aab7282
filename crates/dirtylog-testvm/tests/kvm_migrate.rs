//! Live migration of real KVM guests over loopback, source and destination VMs in this process:
//! every tracker, an idle and a busy guest, the VMM's own writes, and failures at the worst
//! moments. Needs `/dev/kvm` (fails, never skips, without it).

#[path = "../../dirtylog-migrate/tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{proxy, recv_config, Fault};
use dirtylog_migrate::TrackerKind;
use dirtylog_migrate::{
    receive, send, MigrateError, MigrationMemory, Phase, ReceiveReport, SendConfig, SendReport,
    Vcpus,
};
use dirtylog_testvm::migrate::{GuestConfig, KvmSource, KvmTarget, TargetOptions};

/// One KVM test at a time: guests of concurrent tests would share the 2 cores.
fn kvm() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: these tests need KVM; they fail rather than skip"
    );
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn guest(tracker: TrackerKind, rate: Option<u64>) -> GuestConfig {
    GuestConfig {
        mem_bytes: 64 << 20,
        vcpus: 2,
        dirty_rate: rate,
        working_set_bytes: 8 << 20,
        random: false,
        mailbox_every: 100,
        tracker,
        seed: 7,
        huge_pages: true,
        program: dirtylog_testvm::Program::DeviceDirtier,
    }
}

fn boot(cfg: &GuestConfig) -> KvmSource {
    let src = KvmSource::boot(cfg).expect("boot the source guest");
    // Let it dirty its working set and ask for its mailbox.
    std::thread::sleep(Duration::from_millis(200));
    src
}

fn send_config() -> SendConfig {
    SendConfig {
        connections: 2,
        io_timeout: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(20),
        timeout: Some(Duration::from_secs(30)),
        ..SendConfig::default()
    }
}

type Received = Result<(KvmTarget, ReceiveReport), MigrateError>;

/// A receiver thread building a `KvmTarget`; the flag says whether it ever resumed one.
fn receiver() -> (std::net::SocketAddr, JoinHandle<Received>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let resumed = Arc::new(AtomicBool::new(false));
    let flag = resumed.clone();
    let h = std::thread::spawn(move || {
        let r = receive(&listener, &recv_config(), |h| {
            KvmTarget::new(h, &TargetOptions::default())
        });
        if let Ok((t, _)) = &r {
            flag.store(t.is_resumed(), Ordering::SeqCst);
        }
        r
    });
    (addr, h, resumed)
}

/// Wait until `f()` exceeds `floor`.
fn advances(what: &str, floor: u64, f: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = f();
        if v > floor {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: stuck at {v} (floor {floor})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn migrate_ok(src: &KvmSource, config: &SendConfig) -> (SendReport, KvmTarget, ReceiveReport) {
    let (addr, rx, resumed) = receiver();
    let sent = send(src, addr, config, &mut |_| {});
    let received = rx.join().unwrap();
    let report = sent.unwrap_or_else(|e| panic!("send failed: {e}"));
    let (target, rreport) = received.unwrap_or_else(|e| panic!("receive failed: {e}"));
    assert!(resumed.load(Ordering::SeqCst));
    (report, target, rreport)
}

fn busy_migration(tracker: TrackerKind) {
    let _g = kvm();
    let src = boot(&guest(tracker, Some(20_000)));
    let served_before = src.mailbox_served();
    assert!(served_before > 0, "the guest uses its mailbox device");
    let (report, target, rreport) = migrate_ok(&src, &send_config());
    eprintln!(
        "{}: {} rounds, total {} ms, downtime {} ms (hash check {} ms, resume {} ms), {} bytes, \
         {} normal + {} zero pages, mailbox served {} on the source",
        tracker.name(),
        report.rounds.len(),
        report.stats.total_time,
        report.stats.downtime,
        rreport.hash_check_time,
        rreport.resume_time,
        report.stats.transferred,
        report.stats.normal,
        report.stats.duplicate,
        src.mailbox_served(),
    );
    // The source stays paused; its last state is the target's first.
    assert!(src.is_paused());
    let final_writes = src.guest_writes();
    assert!(target.guest_writes() >= final_writes);
    assert_eq!(rreport.rounds, report.rounds.len() as u64);
    assert!(report.rounds.iter().any(|r| r.is_final));
    // The guest runs on at the destination: its counter and its mailbox advance.
    advances("target guest writes", final_writes, || {
        target.guest_writes()
    });
    // The mailbox record arrived intact, and the destination's device carries it on.
    let (seq0, ok) = target.mailbox_record(0);
    assert!(ok && seq0 > 0, "mailbox record {seq0} intact: {ok}");
    let seq = advances("target mailbox sequence", seq0, || {
        target.mailbox_record(0).0
    });
    assert!(target.mailbox_served() > 0);
    assert!(target.mailbox_record(0).1, "mailbox record {seq} intact");
    target.check().unwrap();
    // The source guest really is stopped.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(src.guest_writes(), final_writes);
    target.shutdown().unwrap();
    src.shutdown().unwrap();
}

#[test]
fn busy_guest_dirty_log() {
    busy_migration(TrackerKind::DirtyLog);
}

#[test]
fn busy_guest_clear_log() {
    busy_migration(TrackerKind::ClearLog);
}

#[test]
fn busy_guest_dirty_ring() {
    busy_migration(TrackerKind::Ring { entries: 4096 });
}

#[test]
fn idle_guest_arrives_exactly() {
    let _g = kvm();
    let src = boot(&guest(TrackerKind::ClearLog, Some(0)));
    let (report, target, _) = migrate_ok(&src, &send_config());
    // Nothing dirtied by the guest: after the bulk pass, every round carries the system slot
    // alone, the same pages each time. Settling takes one round more only if the first
    // harvest after the bulk pass halved the dirty set (it found the system slot), and stops
    // when the next did not shrink.
    let rest = &report.rounds[1..];
    assert!(matches!(rest.len(), 1 | 2), "{:?}", report.rounds);
    assert!(
        rest.iter()
            .all(|r| r.stats.dirty_pages == rest[0].stats.dirty_pages
                && r.stats.dirty_pages < 1024),
        "{:?}",
        report.rounds
    );
    assert_eq!(target.guest_writes(), src.guest_writes());
    std::thread::sleep(Duration::from_millis(50));
    target.check().unwrap();
    assert_eq!(target.guest_writes(), src.guest_writes());
    target.shutdown().unwrap();
}

#[test]
fn several_rounds_and_auto_converge() {
    let _g = kvm();
    let src = boot(&guest(TrackerKind::DirtyLog, None));
    let config = SendConfig {
        // Unreachable: rounds go on until the limit, with the throttle climbing.
        downtime_limit: Duration::from_micros(1),
        max_rounds: 4,
        on_timeout: dirtylog_migrate::TimeoutPolicy::Switchover,
        max_bandwidth: Some(256 << 20),
        auto_converge: Some(dirtylog_migrate::AutoConverge {
            trigger_rounds: 1,
            threshold: 1,
            ..Default::default()
        }),
        ..send_config()
    };
    let (report, target, _) = migrate_ok(&src, &config);
    eprintln!(
        "rounds: {:?}",
        report
            .rounds
            .iter()
            .map(|r| (r.stats.dirty_pages, r.cpu_throttle_percentage))
            .collect::<Vec<_>>()
    );
    assert_eq!(report.rounds.len(), 6);
    assert!(report.cpu_throttle_percentage > 0);
    advances("target guest writes", src.guest_writes(), || {
        target.guest_writes()
    });
    target.shutdown().unwrap();
}

#[test]
fn throttle_holds_vcpus_out_of_the_guest() {
    let _g = kvm();
    let src = boot(&guest(TrackerKind::DirtyLog, None));
    let rate = |src: &KvmSource| {
        let (w0, t0) = (src.guest_writes(), Instant::now());
        std::thread::sleep(Duration::from_millis(300));
        (src.guest_writes() - w0) as f64 / t0.elapsed().as_secs_f64()
    };
    let free = rate(&src);
    src.throttle(90).unwrap();
    assert_eq!(src.throttle_percent(), 90);
    let held = rate(&src);
    src.throttle(0).unwrap();
    let again = rate(&src);
    eprintln!("writes/s: {free:.0} free, {held:.0} at a 90% throttle, {again:.0} after");
    // Unthrottled, the two vCPUs share the cores with everything else; held out 90% of the
    // time, each runs 1 ms in 10 at full speed.
    assert!(held < free * 0.5, "{held} vs {free}");
    assert!(held > 0.0);
    assert!(again > held * 2.0, "{again} vs {held}");
    src.shutdown().unwrap();
}

/// Migrate through a fault-injecting proxy; both sides must fail, the source guest must run
/// on, unthrottled, and the target must never have run.
fn faulty(
    rate: u64,
    downtime_ms: u64,
    fault: Fault,
    arm: impl Fn(&dirtylog_migrate::Progress) -> bool,
) -> MigrateError {
    let _g = kvm();
    let src = boot(&guest(TrackerKind::ClearLog, Some(rate)));
    let (addr, rx, resumed) = receiver();
    let p = proxy(addr, fault);
    let config = SendConfig {
        downtime_limit: Duration::from_millis(downtime_ms),
        max_bandwidth: Some(32 << 20),
        max_rounds: 10,
        io_timeout: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(5),
        ..send_config()
    };
    let flag = p.flag.clone();
    let sent = send(&src, p.addr, &config, &mut |pr| {
        if arm(pr) {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let e = sent.expect_err("the migration must fail");
    let re = rx.join().unwrap().expect_err("the receiver must fail");
    eprintln!("source: {e}\nreceiver: {re}");
    assert!(!resumed.load(Ordering::SeqCst), "the target ran");
    assert!(!src.is_paused());
    assert_eq!(src.throttle_percent(), 0);
    advances("source guest after the failure", src.guest_writes(), || {
        src.guest_writes()
    });
    let served = src.mailbox_served();
    advances("source mailbox after the failure", served, || {
        src.mailbox_served()
    });
    src.shutdown().unwrap();
    e
}

#[test]
fn cut_during_a_round_resumes_the_source() {
    // Rounds go on (5 ms is out of reach) until the cut.
    let e = faulty(20_000, 5, Fault::CutAfterFlag(20_000), |p| {
        p.phase == Phase::Iterating
    });
    assert!(!matches!(e, MigrateError::NotConverged { .. }), "{e}");
}

#[test]
fn cut_during_switchover_resumes_the_source() {
    // A slow guest converges at once; the cut comes with the paused guest's final round.
    let e = faulty(1_000, 300, Fault::CutAfterFlag(0), |p| {
        p.phase == Phase::Switchover
    });
    assert!(!matches!(e, MigrateError::NotConverged { .. }), "{e}");
}

#[test]
fn untracked_vmm_writes_fail_the_hash_check() {
    let _g = kvm();
    let src = boot(&guest(TrackerKind::ClearLog, Some(20_000)));
    src.set_vmm_tracking(false);
    let (addr, rx, resumed) = receiver();
    let config = SendConfig {
        // A few rounds, so the mailbox changes after its page was sent.
        downtime_limit: Duration::from_micros(1),
        max_rounds: 3,
        on_timeout: dirtylog_migrate::TimeoutPolicy::Switchover,
        ..send_config()
    };
    let e = send(&src, addr, &config, &mut |_| {}).expect_err("the hash must differ");
    let re = rx.join().unwrap().expect_err("the receiver must refuse");
    eprintln!("source: {e}\nreceiver: {re}");
    assert!(
        matches!(re, MigrateError::HashMismatch { slot: 2, .. }),
        "{re}"
    );
    assert!(e.to_string().contains("hash mismatch in slot 2"), "{e}");
    assert!(!resumed.load(Ordering::SeqCst));
    assert!(!src.is_paused());
    advances("source guest", src.guest_writes(), || src.guest_writes());
    src.shutdown().unwrap();
}

#[test]
fn source_layout_is_system_memory_and_device_slots() {
    let _g = kvm();
    let src = KvmSource::boot(&guest(TrackerKind::DirtyLog, Some(0))).unwrap();
    let regions = MigrationMemory::regions(&src);
    assert_eq!(regions.len(), 3);
    assert_eq!((regions[0].slot, regions[0].gpa), (0, 0));
    assert_eq!(regions[1].size, 64 << 20);
    assert_eq!(regions[2].gpa, regions[1].gpa + regions[1].size);
    src.shutdown().unwrap();
}
