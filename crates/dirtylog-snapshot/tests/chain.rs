//! Round trips on software guests: a full member and diffs in stop and live mode with each
//! tracker, restored byte-identical to the source's memory at the last snapshot point, the
//! restored guest running on; merge; a diff against a chain restored "in another process".

mod common;

use std::time::Duration;

use common::*;
use dirtylog_migrate::TrackerKind;
use dirtylog_snapshot::{
    info, merge, restore, verify, CreateConfig, RestoreOptions, SnapshotMode, Snapshotter,
};

fn chain_round_trip(name: &str, tracker: TrackerKind, mode: SnapshotMode) {
    let src = source(tracker);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("chain");
    let mut snap = Snapshotter::new(&src, &dir, None).unwrap();
    let cfg = CreateConfig {
        mode,
        ..CreateConfig::default()
    };
    let mut stats = Vec::new();
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(40));
        let s = snap
            .take(&cfg)
            .unwrap_or_else(|e| panic!("{name}: take {i}: {e}"));
        assert_eq!(s.path, dir.join(i.to_string()), "{name}");
        stats.push(s);
    }
    snap.finish().unwrap();
    let (image, progress) = src.at_snapshot();
    let total_pages = (24u64 << 20) / PAGE;
    assert_eq!(stats[0].kind, "full");
    assert_eq!(
        stats[0].pages, total_pages,
        "{name}: a full member has every page"
    );
    for s in &stats[1..] {
        assert_eq!(s.kind, "diff");
        // The vCPUs' working set is 3000 pages; the VMM writes pages outside it.
        let bound = 3000 + src.vm.vmm_writes();
        assert!(
            s.pages > 0 && s.pages <= bound,
            "{name}: a diff of {} pages, more than {bound}",
            s.pages
        );
        // Live rounds may write a page more than once; stop mode writes each at most once.
        if mode == SnapshotMode::Stop {
            assert!(s.bytes_written <= s.pages * PAGE);
        }
    }
    if mode == SnapshotMode::Live {
        assert!(stats.iter().all(|s| s.rounds >= 2), "{name}: {stats:?}");
    }

    let tip = dir.join("3");
    let rep = verify(&tip).unwrap();
    assert_eq!(rep.members.len(), 4);
    // The chain directory stands for its last member.
    assert_eq!(verify(&dir).unwrap().members, rep.members);
    let inf = info(&dir).unwrap();
    assert_eq!(inf.members.len(), 4);
    assert_eq!(inf.members[1].kind, "diff");
    assert_eq!(inf.tracker, tracker.to_string());
    // The diffs are small on disk (sparse files).
    for m in &inf.members[1..] {
        assert!(m.disk_bytes <= m.pages_present * PAGE + (1 << 20), "{inf}");
    }
    serde_json::to_string(&inf).unwrap();

    // The chain restores to the source's memory at the last snapshot point.
    let dst = restore_and_check(&tip, &image, progress);
    drop(dst);

    // Merged, it restores to the same.
    let merged = tmp.path().join("merged");
    let m = merge(&tip, &merged).unwrap();
    assert_eq!(m.kind, "full");
    assert_eq!(m.pages, total_pages);
    restore_and_check(&merged.join("0"), &image, progress);

    // An earlier member restores too (to its own point: checked by its digest). Zero pages
    // cost nothing: the base occupies on disk the pages with content and little more.
    let (early, st) = restore(&dir.join("0"), target, &RestoreOptions::default()).unwrap();
    assert_eq!(st.members, 1);
    let nonzero: u64 = early
        .vm
        .resume_image()
        .unwrap()
        .iter()
        .flat_map(|r| r.chunks(PAGE as usize))
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64;
    assert!(nonzero > 0 && nonzero < total_pages);
    assert_eq!(st.bytes_read, nonzero * PAGE, "{name}: only data is read");
    let disk = inf.members[0].disk_bytes;
    assert!(
        disk >= nonzero * PAGE && disk <= nonzero * PAGE + (1 << 20),
        "{name}: base of {disk} bytes on disk for {nonzero} non-zero pages"
    );
    if mode == SnapshotMode::Stop {
        assert_eq!(stats[0].bytes_written, nonzero * PAGE);
    }
}

#[test]
fn stop_mode_dirty_log() {
    chain_round_trip("stop/dirty-log", TrackerKind::DirtyLog, SnapshotMode::Stop);
}

#[test]
fn stop_mode_clear_log() {
    chain_round_trip("stop/clear-log", TrackerKind::ClearLog, SnapshotMode::Stop);
}

#[test]
fn live_mode_clear_log() {
    chain_round_trip("live/clear-log", TrackerKind::ClearLog, SnapshotMode::Live);
}

#[test]
fn live_mode_dirty_log() {
    chain_round_trip("live/dirty-log", TrackerKind::DirtyLog, SnapshotMode::Live);
}

#[test]
fn live_mode_ring() {
    chain_round_trip(
        "live/ring",
        TrackerKind::Ring { entries: 256 },
        SnapshotMode::Live,
    );
}

/// `--parent`: restore a chain paused, start tracking, resume, run, take a diff against
/// the chain into another directory; the new chain (old members + the diff) restores to the
/// restored guest's memory at that point.
#[test]
fn diff_against_a_restored_chain() {
    let src = source(TrackerKind::DirtyLog);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut snap = Snapshotter::new(&src, &dir, None).unwrap();
    snap.take(&CreateConfig::default()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    snap.take(&CreateConfig::default()).unwrap();
    snap.finish().unwrap();
    drop(src);

    let tip = dir.join("1");
    let opts = RestoreOptions {
        resume: false,
        ..RestoreOptions::default()
    };
    let (vm, _) = restore(&tip, target, &opts).unwrap();
    let dir2 = tmp.path().join("b");
    let mut snap = Snapshotter::new(&vm, &dir2, Some(&tip)).unwrap();
    assert_eq!(snap.next_index(), 0);
    dirtylog_migrate::VcpuRestore::resume(&vm.cap).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    let s = snap.take(&CreateConfig::default()).unwrap();
    assert_eq!(s.kind, "diff");
    assert!(s.pages > 0 && s.pages <= 3000 + vm.vm.vmm_writes(), "{s:?}");
    std::thread::sleep(Duration::from_millis(20));
    let s = snap.take(&CreateConfig::default()).unwrap();
    assert_eq!(s.path, dir2.join("1"));
    snap.finish().unwrap();
    let (image, progress) = vm.at_snapshot();
    let chain = dirtylog_snapshot::Chain::open(&dir2.join("1"), true).unwrap();
    assert_eq!(chain.members().len(), 4);
    restore_and_check(&dir2.join("1"), &image, progress);

    // A parent in the same directory continues the numbering; a taken number is refused.
    let (vm2, _) = restore(&tip, target, &opts).unwrap();
    let e = Snapshotter::new(&vm2, &dir, Some(&dir.join("0")))
        .err()
        .expect("member 1 exists already");
    assert!(e.to_string().contains("already holds member 1"), "{e}");
    let snap = Snapshotter::new(&vm2, &dir, Some(&tip)).unwrap();
    assert_eq!(snap.next_index(), 2);
    drop(snap);
    // Without a parent, a directory holding a chain is refused.
    let e = Snapshotter::new(&vm2, &dir, None).err().unwrap();
    assert!(e.to_string().contains("already holds a chain"), "{e}");
}
