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

/// Start `migrate receive --json ARGS` on a free loopback port: the child, its stdout lines
/// and the address it listens on.
fn start_receiver(
    args: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
    String,
) {
    let mut child = Command::new(EXE)
        .args(["migrate", "receive", "--listen", "127.0.0.1:0", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "listening", "{first}");
    let addr = first["address"].as_str().unwrap().to_string();
    (child, lines, addr)
}

/// A stream header for one region of `size` bytes and one vCPU, then a Hello for a
/// one-connection migration, on a fresh connection to `addr`.
fn fake_sender(addr: &str, size: u64) -> dirtylog_migrate::wire::Encoder<TcpStream> {
    use dirtylog_migrate::wire::{Encoder, Message, Region, StreamHeader};
    let header = StreamHeader::new(
        4096,
        1,
        vec![Region {
            slot: 0,
            gpa: 0,
            size,
        }],
    )
    .unwrap();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut enc = Encoder::new(s, header).unwrap();
    enc.send(Message::Hello {
        connection: 0,
        connections: 1,
        session: 1,
    })
    .unwrap();
    enc.flush().unwrap();
    enc
}

/// The receiver's last JSON line and exit status.
fn outcome(
    mut child: std::process::Child,
    mut lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
) -> (Value, Option<i32>) {
    let last: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the receiver did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    (last, status.code())
}

/// A stream announcing a 511 GiB guest is refused before any memory is allocated, by the
/// default bound (this host's memory) and by --max-memory (in any form of size people type),
/// and the guest never runs. No /dev/kvm needed: no VM is built.
#[test]
fn a_511_gib_guest_is_refused_by_the_memory_bound() {
    let host: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    assert!(
        host < 511 << 30,
        "this test needs a host with less than 511 GiB"
    );
    for args in [&[][..], &["--max-memory", "1GiB"][..]] {
        let (child, lines, addr) = start_receiver(&[&["--accept-timeout-s", "20"], args].concat());
        let _sender = fake_sender(&addr, 511 << 30);
        let (last, code) = outcome(child, lines);
        assert_eq!(last["event"], "failed", "{args:?}: {last}");
        let e = last["error"].as_str().unwrap();
        assert!(
            e.contains("the guest has 548682072064 bytes of memory, more than the limit of"),
            "{args:?}: {e}"
        );
        if !args.is_empty() {
            assert!(e.contains("more than the limit of 1073741824"), "{e}");
        }
        assert_eq!(code, Some(1));
    }
    // "1GB" is ambiguous: refused with a hint before listening.
    let out = Command::new(EXE)
        .args(["migrate", "receive", "--listen", "127.0.0.1:0"])
        .args(["--max-memory", "1GB"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ambiguous") && err.contains("1G or 1GiB"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// What a peer says is printed with its control characters escaped: an `Error` frame from
/// the "sender" (in place of its Hello: no VM is built, no /dev/kvm needed) cannot forge
/// lines or drive the terminal of the receiver's operator.
#[test]
fn a_remote_error_is_printed_escaped() {
    use dirtylog_migrate::wire::{Encoder, Message, Region, StreamHeader};
    let mut child = Command::new(EXE)
        .args(["migrate", "receive", "--listen", "127.0.0.1:0"])
        .args(["--accept-timeout-s", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.strip_prefix("listening on ").unwrap().to_string();
    let header = StreamHeader::new(
        4096,
        1,
        vec![Region {
            slot: 0,
            gpa: 0,
            size: 1 << 20,
        }],
    )
    .unwrap();
    let mut sender = Encoder::new(TcpStream::connect(&addr).unwrap(), header).unwrap();
    sender
        .send(Message::Error {
            code: 1,
            message: "oops\nmigration completed\x1b[2J",
        })
        .unwrap();
    sender.flush().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let _ = child.wait();
    let all = rest.join("\n");
    assert!(
        all.contains("the source reported an error (code 1): oops\\nmigration completed\\u{1b}[2J"),
        "{all}"
    );
    assert!(!all.contains('\x1b'), "{all}");
    assert!(!rest.iter().any(|l| l == "migration completed"), "{all}");
}

/// Options that cannot take effect are refused before any work: --ring-entries without a
/// ring tracker (send and demo), and a demo with no memory — which used to boot-fail after
/// starting its receiver process and leave that running.
#[test]
fn options_that_cannot_take_effect_are_refused_before_any_work() {
    let out = Command::new(EXE)
        .args([
            "migrate",
            "send",
            "--to",
            "127.0.0.1:9",
            "--ring-entries",
            "1024",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--ring-entries applies to --tracker ring, not to --tracker clear-log"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // Every process the demo starts inherits this mark: none may be left once it returns.
    let mark = format!("DIRTYLOG_TEST_MARK=demo-mem-0-{}", std::process::id());
    for args in [
        &["--mem", "0"][..],
        &["--mem", "1000"][..],
        &["--ring-entries", "1024"][..],
    ] {
        let out = Command::new(EXE)
            .arg("demo")
            .args(args)
            .env("DIRTYLOG_TEST_MARK", &mark["DIRTYLOG_TEST_MARK=".len()..])
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert!(
            all.contains("positive multiple of 4 KiB") || all.contains("--ring-entries applies"),
            "{args:?}: {all}"
        );
        let left: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let env = std::fs::read(e.path().join("environ")).ok()?;
                env.split(|&b| b == 0)
                    .any(|v| v == mark.as_bytes())
                    .then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect();
        assert!(
            left.is_empty(),
            "{args:?}: processes left running: {left:?}"
        );
    }
}
