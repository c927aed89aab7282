//! `dirtylog run --kernel` and `dirtylog demo --kernel` end to end with the project's own
//! Multiboot kernels: QEMU's exit-status convention, serial input and output, migrations on
//! the guest's request, and a kernel migrated between two processes. Needs `/dev/kvm` (fails,
//! never skips, without it).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_dirtylog");

/// One KVM test at a time (2 cores).
fn kvm() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: these tests need KVM; they fail rather than skip"
    );
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The project's kernels, written to a fresh directory.
fn kernel(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dirtylog-run-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dirtylog_testvm::kernels::write_to(&dir).unwrap();
    dir.join(format!("{name}.elf"))
}

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(EXE)
        .arg("run")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn run_exits_with_the_guests_status_like_qemu() {
    let _g = kvm();
    let k = kernel("info");
    let out = run(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--append",
            "exit=3",
            "--smp",
            "2",
        ],
        b"",
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("cmdline: ") && stdout.contains("exit=3"),
        "{stdout}"
    );
    assert!(stdout.contains("cpus: 2"), "{stdout}");
    assert!(text(&out.stderr).contains("exit status 7"));
}

#[test]
fn run_feeds_stdin_to_the_serial_port() {
    let _g = kvm();
    let k = kernel("echo");
    let out = run(&["--kernel", k.to_str().unwrap()], b"xyz q");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("xyz"), "{}", text(&out.stdout));
}

#[test]
fn run_migrates_on_the_guests_request() {
    let _g = kvm();
    let k = kernel("memtest");
    let out = run(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--append",
            "mode=request mb=2 step=4096 rounds=2",
            "--migrate",
            "on-request",
            "--json",
        ],
        b"",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(text(&out.stdout).contains("memtest: PASS"));
    let events: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let migrations = events.iter().filter(|e| e["event"] == "migration").count();
    assert_eq!(migrations, 2, "{stderr}");
    let done = events
        .iter()
        .find(|e| e["event"] == "done")
        .expect("a summary");
    assert_eq!(done["migrations"], 2);
    assert_eq!(done["exit-status"], 1);
}

#[test]
fn run_takes_a_builtin_kernel_by_name() {
    let _g = kvm();
    let out = run(&["--kernel", "builtin:info", "--append", "exit=1"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cmdline: builtin:info exit=1"));
    let out = run(&["--kernel", "builtin:nope"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("use one of info, echo"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_refuses_a_file_that_is_not_a_multiboot_kernel() {
    let _g = kvm();
    let out = run(&["--kernel", EXE], b"");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("loading the kernel"), "{stderr}");
}

#[test]
fn demo_migrates_a_kernel_between_two_processes() {
    let _g = kvm();
    let k = kernel("memtest");
    let out = Command::new(EXE)
        .args(["demo", "--kernel", k.to_str().unwrap()])
        .args(["--append", "mode=passes mb=4 step=4096"])
        .args([
            "--mem",
            "64M",
            "--vcpus",
            "1",
            "--run-for-ms",
            "600",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    // JSON lines: progress events, then the outcome.
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(v["source"]["status"], "completed", "{stdout}");
    assert_eq!(v["guest-ran-on-destination"], true, "{stdout}");
    let serial: Vec<&Value> = v["destination"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "serial")
        .collect();
    assert!(
        serial
            .iter()
            .all(|e| !e["line"].as_str().unwrap().contains("MISMATCH")),
        "{stdout}"
    );
}
