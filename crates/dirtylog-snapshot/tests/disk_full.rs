//! A full disk (a small tmpfs, mounted by the test; it needs root, as CI runs): the failing
//! member ends in `DiskFull`, its temporary directory is gone, the earlier members are intact,
//! and once space is freed the next member holds every page the failed one should have.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use dirtylog_migrate::TrackerKind;
use dirtylog_snapshot::{verify, CreateConfig, SnapshotError, Snapshotter};

/// A tmpfs of `mib` MiB, unmounted on drop.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn new(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path, dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn a_full_disk_discards_the_new_member_and_keeps_the_chain() {
    let fs = Tmpfs::new(40);
    let dir = fs.0.join("chain");
    let src = source(TrackerKind::ClearLog);
    let mut snap = Snapshotter::new(&src, &dir, None).unwrap();
    snap.take(&CreateConfig::default()).unwrap();
    // Fill the disk but for a few pages.
    let filler = fs.0.join("filler");
    let free = {
        let st = nix_statvfs(&fs.0);
        st.saturating_sub(64 << 10)
    };
    std::fs::write(&filler, vec![1u8; free as usize]).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    let e = snap
        .take(&CreateConfig::default())
        .expect_err("the disk is full");
    assert!(matches!(e, SnapshotError::DiskFull { .. }), "{e}");
    assert!(e.to_string().contains("no space left"), "{e}");
    assert!(
        leftovers(&dir).is_empty(),
        "temporary member left: {:?}",
        leftovers(&dir)
    );
    assert!(!dir.join("1").exists());
    verify(&dir.join("0")).unwrap();

    // Space again: the next member is number 1 and holds the failed one's pages too.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let s = snap.take(&CreateConfig::default()).unwrap();
    assert_eq!(s.path, dir.join("1"));
    std::thread::sleep(Duration::from_millis(20));
    snap.take(&CreateConfig::default()).unwrap();
    snap.finish().unwrap();
    let (image, progress) = src.at_snapshot();
    restore_and_check(&dir.join("2"), &image, progress);
}

/// Free bytes of the file system at `path`.
fn nix_statvfs(path: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(path)
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}
