//! End-to-end loopback migrations between two software VMs: sender and receiver in threads
//! of this process on 127.0.0.1. Bandwidth is capped in the convergence tests so that they
//! behave the same in debug and release builds.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dirtylog_migrate::soft::Workload;
use dirtylog_migrate::TrackerKind;
use dirtylog_migrate::{
    AutoConverge, MigrateError, Progress, SendConfig, SwitchoverReason, TimeoutPolicy,
};

fn check_success(
    name: &str,
    src: &dirtylog_migrate::soft::SoftVm,
    sent: Result<dirtylog_migrate::SendReport, MigrateError>,
    received: Received,
) -> dirtylog_migrate::SendReport {
    let report = sent.unwrap_or_else(|e| panic!("{name}: send failed: {e}"));
    let (dst, rrep) = received.unwrap_or_else(|e| panic!("{name}: receive failed: {e}"));
    // The source stays paused after success: its memory is the final image.
    assert!(src.is_paused(), "{name}: source runs after success");
    assert_same_memory(src, &dst);
    assert_eq!(rrep.transferred, report.stats.transferred, "{name}");
    assert_eq!(rrep.normal, report.stats.normal, "{name}");
    assert_eq!(rrep.duplicate, report.stats.duplicate, "{name}");
    assert_eq!(rrep.rounds, report.rounds.len() as u64, "{name}");
    assert_eq!(dst.resume_count(), 1);
    let final_progress = source_progress(src);
    assert!(target_progress(&dst) >= final_progress);
    assert_runs(name, || target_progress(&dst));
    let r = report.rounds.last().unwrap();
    assert!(r.is_final);
    // The breakdown's phases follow one another from the pause to the guest running at the
    // destination, so they add up to the downtime (whole ms, truncated; each phase truncated
    // to whole µs); the check waits in the blackout only in strict mode.
    let b = report.downtime_breakdown;
    let sum = b.total();
    assert!(
        sum / 1000 <= report.stats.downtime && report.stats.downtime <= sum / 1000 + 1,
        "{name}: {b:?} against {} ms",
        report.stats.downtime
    );
    if report.verify != dirtylog_migrate::Verify::Strict {
        assert_eq!(b.verify, 0, "{name}: {b:?}");
    }
    assert_eq!(report.verify, rrep.verify, "{name}");
    assert_eq!(
        report.downtime_limit_exceeded,
        report.stats.downtime > report.downtime_limit,
        "{name}"
    );
    eprintln!(
        "{name}: {} rounds, {} sent, {} zero, downtime {} ms, total {} ms, switchover {:?}, \
         throttle {}%",
        report.rounds.len(),
        report.stats.normal,
        report.stats.duplicate,
        report.stats.downtime,
        report.stats.total_time,
        report.switchover,
        report.cpu_throttle_percentage
    );
    report
}

#[test]
fn idle_guest_one_connection() {
    let src = soft(layout(6, 2), 1, TrackerKind::DirtyLog, Workload::idle());
    let (sent, received) = migrate(&src, &send_config(1));
    let report = check_success("idle-1", &src, sent, received);
    assert_eq!(report.switchover, SwitchoverReason::Converged);
    let total_pages = 8 << 20 >> 12;
    let unpopulated: u64 = report
        .rounds
        .iter()
        .map(|r| r.stats.unpopulated_pages)
        .sum();
    assert_eq!(
        report.stats.normal + report.stats.duplicate + unpopulated,
        total_pages
    );
    // 40% of pages have content; the rest were never written, so the bulk pass skips them
    // unread (the software VM's memory is private anonymous) and sends nothing for them.
    assert!(unpopulated > total_pages / 2, "{report:?}");
    assert_eq!(report.rounds[0].stats.unpopulated_pages, unpopulated);
    assert!(
        report.stats.transferred < 4 << 20,
        "{}",
        report.stats.transferred
    );
    assert_eq!(report.rounds.len(), 2, "bulk pass and final round");
}

#[test]
fn idle_guest_three_connections() {
    let src = soft(layout(6, 2), 2, TrackerKind::DirtyLog, Workload::idle());
    let (sent, received) = migrate(&src, &send_config(3));
    let report = check_success("idle-3", &src, sent, received);
    assert_eq!(report.connections, 3);
}

fn moderate(tracker: TrackerKind, connections: usize, chunk: u64) {
    let name = format!("moderate-{tracker:?}-{connections}");
    let mut w = workload(512, Some(1000), true);
    w.vmm_rate = Some(1000);
    let src = soft(layout(6, 2), 2, tracker, w);
    std::thread::sleep(Duration::from_millis(20));
    let config = SendConfig {
        clear_chunk_bytes: chunk,
        downtime_limit: Duration::from_millis(5),
        max_bandwidth: Some(40 << 20),
        ..send_config(connections)
    };
    let (sent, received) = migrate(&src, &config);
    let report = check_success(&name, &src, sent, received);
    assert!(
        report.rounds.len() >= 3,
        "expected pre-copy rounds: {report:?}"
    );
    assert!(report.rounds[1].stats.dirty_pages > 0);
    assert_eq!(report.switchover, SwitchoverReason::Converged);
    assert!(src.vmm_writes() > 0, "the device thread wrote nothing");
}

#[test]
fn moderate_dirty_log_one_connection() {
    moderate(TrackerKind::DirtyLog, 1, 1 << 30);
}

#[test]
fn moderate_clear_log_small_chunks_three_connections() {
    // 64-page chunks: the smallest QEMU allows.
    moderate(TrackerKind::ClearLog, 3, 64 * PAGE);
}

#[test]
fn moderate_ring_three_connections() {
    moderate(TrackerKind::Ring { entries: 256 }, 3, 1 << 30);
}

/// A writer that out-dirties the capped bandwidth: 40 000 random page writes per second over
/// 4 MiB, against 16 MiB/s (4 000 pages/s) and a 20 ms downtime budget.
fn heavy(tracker: TrackerKind) -> dirtylog_migrate::soft::SoftVm {
    soft(layout(6, 2), 1, tracker, workload(1024, Some(40_000), true))
}

fn heavy_config(connections: usize) -> SendConfig {
    SendConfig {
        downtime_limit: Duration::from_millis(20),
        max_bandwidth: Some(16 << 20),
        ..send_config(connections)
    }
}

#[test]
fn heavy_converges_with_auto_converge() {
    let src = heavy(TrackerKind::ClearLog);
    let config = SendConfig {
        auto_converge: Some(AutoConverge {
            trigger_rounds: 1,
            ..AutoConverge::default()
        }),
        ..heavy_config(2)
    };
    let mut throttles = Vec::new();
    let (addr, receiver, _) = spawn_receiver(recv_config());
    let sent = dirtylog_migrate::send(&src, addr, &config, &mut |p: &Progress| {
        if throttles.last() != Some(&p.throttle) {
            throttles.push(p.throttle);
        }
    });
    let report = check_success("heavy-auto-converge", &src, sent, receiver.join().unwrap());
    assert_eq!(report.switchover, SwitchoverReason::Converged);
    assert!(report.cpu_throttle_percentage >= 20, "{report:?}");
    // QEMU's steps: 20, then +10.
    assert_eq!(throttles[..3], [0, 20, 30], "{throttles:?}");
}

#[test]
fn heavy_without_throttle_cancels_at_the_timeout() {
    let src = heavy(TrackerKind::DirtyLog);
    let config = SendConfig {
        timeout: Some(Duration::from_millis(1500)),
        on_timeout: TimeoutPolicy::Cancel,
        ..heavy_config(1)
    };
    let t = Instant::now();
    let (addr, receiver, resumed) = spawn_receiver(recv_config());
    let err = dirtylog_migrate::send(&src, addr, &config, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, MigrateError::NotConverged { why: "timeout", .. }),
        "{msg}"
    );
    assert!(msg.contains("did not converge"), "{msg}");
    assert!(msg.contains("(limit 20 ms)"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    eprintln!("{msg}");
    assert!(!src.is_paused());
    assert_runs("source after cancel", || source_progress(&src));
    let rerr = receiver.join().unwrap().expect_err("receiver must fail");
    assert!(matches!(rerr, MigrateError::Cancelled), "{rerr}");
    assert!(!resumed.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn heavy_switches_over_at_the_round_limit() {
    let src = heavy(TrackerKind::Ring { entries: 4096 });
    let config = SendConfig {
        max_rounds: 3,
        on_timeout: TimeoutPolicy::Switchover,
        ..heavy_config(3)
    };
    let (sent, received) = migrate(&src, &config);
    let report = check_success("heavy-round-limit", &src, sent, received);
    assert_eq!(report.switchover, SwitchoverReason::RoundLimit);
    assert_eq!(report.rounds.len(), 5, "bulk, 3 rounds, final");
}

/// A connection whose `flush` (after `Done`, at the end of every round) waits: the
/// destination's acknowledgement then reaches the source before its own connection thread
/// reports that it finished sending.
struct SlowFlush(std::os::unix::net::UnixStream);

impl std::io::Read for SlowFlush {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl std::io::Write for SlowFlush {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn write_vectored(&mut self, b: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.write_vectored(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(300));
        self.0.flush()
    }
}

impl dirtylog_migrate::Transport for SlowFlush {
    fn try_clone(&self) -> std::io::Result<Self> {
        self.0.try_clone().map(SlowFlush)
    }
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        self.0.shutdown(how)
    }
}

/// The acknowledgement may overtake the source's own "finished sending": the migration
/// succeeds (before, the source took the early Ack for a failure and resumed its guest while
/// the destination ran it too).
#[test]
fn an_acknowledgement_before_the_source_finished_sending_counts() {
    use dirtylog_migrate::{receive_on, send_on};
    let src = soft(layout(4, 1), 1, TrackerKind::DirtyLog, Workload::idle());
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (sent, received) = std::thread::scope(|s| {
        let r = s.spawn(|| {
            receive_on(b, Vec::new(), &Default::default(), |h| {
                let vm = dirtylog_migrate::soft::SoftVm::target(h, TrackerKind::DirtyLog)?;
                vm.keep_resume_image();
                Ok(vm)
            })
        });
        let sent = send_on(&src, vec![SlowFlush(a)], &send_config(1), &mut |_| {});
        (sent, r.join().unwrap())
    });
    check_success("early-ack", &src, sent, received);
}

/// A limit below what the pause and the state save alone cost can never be met: it is refused
/// at once, not after the round limit's worth of empty rounds; with the switchover policy the
/// migration goes through and its report says the limit was exceeded.
#[test]
fn a_limit_below_the_fixed_costs_is_refused_or_reported_exceeded() {
    let src = soft(layout(6, 2), 1, TrackerKind::DirtyLog, Workload::idle());
    src.set_slow_switchover(Duration::from_millis(40), Duration::from_millis(30));
    let config = SendConfig {
        downtime_limit: Duration::from_millis(20),
        ..send_config(1)
    };
    let (sent, received) = migrate(&src, &config);
    let err = sent.expect_err("a limit below the fixed costs cannot be met");
    assert!(
        matches!(&err, MigrateError::NotConverged { rounds: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("alone exceed the limit"), "{err}");
    received.expect_err("the receiver was cancelled");
    assert!(!src.is_paused());

    let config = SendConfig {
        on_timeout: TimeoutPolicy::Switchover,
        ..config
    };
    let (sent, received) = migrate(&src, &config);
    let report = check_success("limit-unreachable", &src, sent, received);
    assert_eq!(report.switchover, SwitchoverReason::LimitUnreachable);
    assert!(report.downtime_limit_exceeded, "{report:?}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["downtime-limit-exceeded"], true);
    assert_eq!(json["downtime-limit"], 20);
    assert_eq!(json["switchover"], "limit-unreachable");
}

/// With `settle` (the default), rounds go on after the estimate first fits the limit for as
/// long as each halves the dirty set, and the switchover comes when one does not (or the
/// dirty set is empty, or the round limit is reached); without it, at the first fit.
#[test]
fn settle_keeps_sending_while_the_dirty_set_halves() {
    let config = |settle| SendConfig {
        downtime_limit: Duration::from_secs(2),
        max_bandwidth: Some(40 << 20),
        settle,
        ..send_config(1)
    };
    let src = soft(
        layout(6, 2),
        1,
        TrackerKind::ClearLog,
        workload(512, Some(1000), true),
    );
    let (sent, received) = migrate(&src, &config(false));
    let report = check_success("settle-off", &src, sent, received);
    assert_eq!(report.rounds.len(), 2, "bulk and final: {report:?}");

    let src = soft(
        layout(6, 2),
        1,
        TrackerKind::ClearLog,
        workload(512, Some(1000), true),
    );
    let (sent, received) = migrate(&src, &config(true));
    let report = check_success("settle-on", &src, sent, received);
    let dirty: Vec<u64> = report.rounds.iter().map(|r| r.stats.dirty_pages).collect();
    let (last, before) = dirty.split_last().unwrap();
    // Every pre-copy round was sent because its dirty set was at most half the one before
    // (the bulk pass counts as all pages); the final one was not.
    for pair in before.windows(2) {
        assert!(pair[1] * 2 <= pair[0], "{dirty:?}");
    }
    let prev = *before.last().unwrap();
    let round_limit = report.rounds.len() as u64 - 1 > send_config(1).max_rounds;
    assert!(
        *last == 0 || *last * 2 > prev || round_limit,
        "switched over while still halving: {dirty:?}"
    );
}
