//! The `migrate` and `demo` commands end to end, as separate processes on loopback. Needs
//! `/dev/kvm` (fails, never skips, without it).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

#[test]
fn demo_migrates_between_two_processes() {
    let _g = kvm();
    let t = Instant::now();
    let out = Command::new(EXE)
        .args([
            "demo",
            "--mem",
            "128M",
            "--working-set",
            "16M",
            "--run-for-ms",
            "400",
        ])
        .args(["--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // JSON lines: progress events, then the outcome.
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(v["event"], "completed", "{v:#}");
    assert_eq!(v["source"]["status"], "completed", "{v:#}");
    let m = &v["source"]["migration"];
    assert!(m["downtime"].as_u64().is_some());
    assert!(m["transferred"].as_u64().unwrap() > 0);
    assert!(m["rounds"].as_array().unwrap().len() >= 2);
    assert_eq!(v["guest-ran-on-destination"], true);
    let events: Vec<&str> = v["destination"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert_eq!(events.first(), Some(&"listening"));
    assert!(
        events.contains(&"completed") && events.contains(&"sample"),
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&"done"));
    eprintln!("demo (debug build) in {:?}", t.elapsed());
}

#[test]
fn send_explains_a_missing_receiver() {
    let _g = kvm();
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(EXE)
        .args(["migrate", "send", "--to", &format!("127.0.0.1:{port}")])
        .args(["--mem", "16M", "--working-set", "1M", "--warmup-ms", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "could not connect to 127.0.0.1:{port}: connection refused — is `dirtylog migrate \
             receive` listening?"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("the source guest runs on"), "{stdout}");
}

#[test]
fn receiver_refuses_a_bad_stream_without_running_a_guest() {
    let _g = kvm();
    let mut child = Command::new(EXE)
        .args(["migrate", "receive", "--listen", "127.0.0.1:0", "--json"])
        .args(["--accept-timeout-s", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "listening");
    let mut s = TcpStream::connect(first["address"].as_str().unwrap()).unwrap();
    s.write_all(b"not a migration stream at all").unwrap();
    drop(s);
    let last: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(last["event"], "failed", "{last}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the receiver did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
}

/// Numbers too large for a clock, or a connection count the engine refuses, are refused when
/// the arguments are read: no panic, no guest booted first.
#[test]
fn out_of_range_numbers_are_refused_up_front() {
    for args in [
        &[
            "migrate",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--accept-timeout-s",
            "18446744073709551615",
        ][..],
        &[
            "migrate",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--timeout-s",
            "18446744073709551615",
        ][..],
        &[
            "migrate",
            "send",
            "--to",
            "127.0.0.1:9",
            "--connections",
            "100000",
        ][..],
        &["migrate", "send", "--to", "127.0.0.1:9", "--timeout-s", "0"][..],
        &[
            "run",
            "--kernel",
            "builtin:halt",
            "--time-limit-s",
            "99999999999",
        ][..],
    ] {
        let out = Command::new(EXE).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid value"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing started");
    }
}

/// A limit the blackout cannot keep (strict verification digests all memory in it) is either
/// refused up front with a hint, or — with `--on-timeout switchover` — the migration goes
/// through and both the text and the JSON say the limit was exceeded.
#[test]
fn an_exceeded_downtime_limit_is_reported() {
    let _g = kvm();
    let common = [
        "demo",
        "--mem",
        "128M",
        "--working-set",
        "4M",
        "--run-for-ms",
        "100",
        "--no-plot",
        "--verify",
        "strict",
        "--downtime-ms",
        "1",
    ];
    let out = Command::new(EXE).args(common).output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("alone exceed the limit"), "{all}");
    assert!(all.contains("verify in the background"), "{all}");

    let out = Command::new(EXE)
        .args(common)
        .args(["--on-timeout", "switchover"])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(all.contains("EXCEEDED the limit of 1 ms"), "{all}");

    let out = Command::new(EXE)
        .args(common)
        .args(["--on-timeout", "switchover", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(last["event"], "completed", "{last}");
    let migration = &last["source"]["migration"];
    assert_eq!(migration["downtime-limit-exceeded"], true, "{last}");
    assert_eq!(migration["downtime-limit"], 1, "{last}");
}
