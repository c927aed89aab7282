//! A chain with a truncated file, a flipped bit, a missing member or a parent from another
//! chain is refused with a message naming the member, and nothing is restored (the target
//! factory is never called); a leftover temporary member is ignored and cleaned up.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use dirtylog_migrate::TrackerKind;
use dirtylog_snapshot::{verify, Chain, CreateConfig, Snapshotter};

/// A chain of a full member and two diffs in `dir`.
fn make_chain(dir: &Path) {
    let src = source(TrackerKind::DirtyLog);
    let mut snap = Snapshotter::new(&src, dir, None).unwrap();
    for _ in 0..3 {
        snap.take(&CreateConfig::default()).unwrap();
        std::thread::sleep(Duration::from_millis(15));
    }
    snap.finish().unwrap();
}

fn expect_refusal(tip: &Path, member: &Path, what: &str) {
    let (e, made) = refused(tip);
    let msg = e.to_string();
    assert_eq!(made, 0, "a target was built despite: {msg}");
    assert!(
        msg.contains(&member.display().to_string()),
        "the error does not name {}: {msg}",
        member.display()
    );
    assert!(msg.contains(what), "expected {what:?} in: {msg}");
    assert!(verify(tip).is_err());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn fresh(tmp: &Path, name: &str, base: &Path) -> PathBuf {
    let d = tmp.join(name);
    copy_dir(base, &d);
    d
}

#[test]
fn damaged_chains_are_refused_naming_the_member() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    make_chain(&base);
    assert!(verify(&base.join("2")).is_ok());

    // Truncated memory file of the middle member.
    let d = fresh(tmp.path(), "truncated", &base);
    let f = OpenOptions::new()
        .write(true)
        .open(d.join("1/mem-0.raw"))
        .unwrap();
    f.set_len((16 << 20) - 4096).unwrap();
    expect_refusal(&d.join("2"), &d.join("1"), "truncated");

    // One flipped bit in the base's data.
    let d = fresh(tmp.path(), "flipped", &base);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("0/mem-1.raw"))
        .unwrap();
    let mut b = [0u8; 1];
    let off = 5 * 4096 + 123;
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], off).unwrap();
    expect_refusal(&d.join("2"), &d.join("0"), "checksum");
    // Opening without the data check does not read the chunks; verify does.
    assert!(Chain::open(&d.join("2"), false).is_ok());

    // A flipped bit in a present bitmap (listed and summed like any file).
    let d = fresh(tmp.path(), "flipped-present", &base);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("2/mem-0.present"))
        .unwrap();
    f.read_exact_at(&mut b, 0).unwrap();
    f.write_all_at(&[b[0] ^ 1], 0).unwrap();
    expect_refusal(&d.join("2"), &d.join("2"), "checksum");

    // A missing member.
    let d = fresh(tmp.path(), "missing", &base);
    std::fs::remove_dir_all(d.join("1")).unwrap();
    expect_refusal(&d.join("2"), &d.join("1"), "missing");

    // A member without its manifest (an interrupted write renamed by hand, say).
    let d = fresh(tmp.path(), "no-manifest", &base);
    std::fs::remove_file(d.join("0/manifest.json")).unwrap();
    expect_refusal(&d.join("2"), &d.join("0"), "manifest");

    // An unparsable manifest.
    let d = fresh(tmp.path(), "garbled", &base);
    std::fs::write(d.join("2/manifest.json"), b"{\"format\": 1, ").unwrap();
    expect_refusal(&d.join("2"), &d.join("2"), "does not parse");

    // The parent replaced by the same-numbered member of another chain.
    let other = tmp.path().join("other");
    make_chain(&other);
    let d = fresh(tmp.path(), "replaced", &base);
    std::fs::remove_dir_all(d.join("1")).unwrap();
    copy_dir(&other.join("1"), &d.join("1"));
    expect_refusal(&d.join("2"), &d.join("1"), "not the snapshot");
}

#[test]
fn a_leftover_temporary_member_is_ignored_and_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    make_chain(&dir);
    // What a writer killed before its rename leaves: a temporary member with a dead pid.
    let dead = dir.join(".3.tmp-999999999");
    std::fs::create_dir(&dead).unwrap();
    std::fs::write(dead.join("mem-0.raw"), vec![7u8; 4096]).unwrap();
    let inf = dirtylog_snapshot::info(&dir).unwrap();
    assert_eq!(inf.members.len(), 3);
    assert!(verify(&dir.join("2")).is_ok());
    // The next create in the directory continues the chain and removes the leftover.
    let (vm, _) = dirtylog_snapshot::restore(
        &dir.join("2"),
        target,
        &dirtylog_snapshot::RestoreOptions {
            resume: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut snap = Snapshotter::new(&vm, &dir, Some(&dir.join("2"))).unwrap();
    assert!(!dead.exists(), "leftover not cleaned");
    dirtylog_migrate::VcpuRestore::resume(&vm.cap).unwrap();
    let s = snap.take(&CreateConfig::default()).unwrap();
    assert_eq!(s.path, dir.join("3"));
    snap.finish().unwrap();
    let (image, progress) = vm.at_snapshot();
    restore_and_check(&dir.join("3"), &image, progress);
}
