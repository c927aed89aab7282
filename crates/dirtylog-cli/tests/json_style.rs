//! Every command's `--json` output keeps the one style of docs/JSON.md: a top-level
//! `"schema-version": 1` in every document and line, kebab-case keys all the way down, times
//! as integers; `migrate send --json` and `demo --json` stream progress events and end with
//! one `completed` or `failed` line; `--plot` draws an SVG. Needs `/dev/kvm` (fails, never
//! skips, without it).

use std::io::{BufRead, BufReader};
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

/// A fresh directory for this test's files.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dirtylog-json-style-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn is_kebab(k: &str) -> bool {
    !k.is_empty()
        && k.split('-').all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        && k.starts_with(|c: char| c.is_ascii_lowercase())
}

/// A key that holds a time: a unit part (`-ms`, `-us`, `-ns`) or a QEMU-style `-time`, or
/// `downtime`.
fn is_time(k: &str) -> bool {
    k.split('-')
        .any(|w| matches!(w, "ms" | "us" | "ns" | "time" | "downtime"))
}

/// Every key of `v`, recursively, is kebab-case, and every time is an integer (or null).
fn check_style(v: &Value, path: &str, errors: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{path}.{k}");
                if !is_kebab(k) {
                    errors.push(format!("{p}: key not kebab-case"));
                }
                // A time, unless it is an object of times (a breakdown) or a string.
                if is_time(k) && (x.is_number() && !x.is_u64()) {
                    errors.push(format!("{p}: time {x} is not an integer"));
                }
                check_style(x, &p, errors);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_style(x, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

/// `doc` is a JSON object in the style, with `"schema-version": 1` at the top.
fn check_doc(what: &str, doc: &Value) {
    assert_eq!(doc["schema-version"], 1, "{what}: no schema-version: {doc}");
    let mut errors = Vec::new();
    check_style(doc, "", &mut errors);
    assert!(errors.is_empty(), "{what}: {errors:#?}\n{doc:#}");
}

/// Every line of `out` is one JSON object in the style.
fn check_lines(what: &str, out: &str) -> Vec<Value> {
    let lines: Vec<Value> = out
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{what}: {l:?} is not a JSON line: {e}\n{out}"))
        })
        .collect();
    assert!(!lines.is_empty(), "{what}: no output");
    for l in &lines {
        check_doc(what, l);
    }
    lines
}

fn events(lines: &[Value]) -> Vec<&str> {
    lines.iter().filter_map(|l| l["event"].as_str()).collect()
}

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn caps_selftest_and_perf_print_one_styled_document() {
    let _g = kvm();
    for args in [
        &["caps", "--json"][..],
        &[
            "selftest",
            "--iterations",
            "1",
            "--interval-ms",
            "10",
            "--json",
        ][..],
        &["perf", "--mem-per-vcpu", "4M", "--json"][..],
    ] {
        let out = run(args);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            text(&out.stderr)
        );
        let doc: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON document: {e}\n{stdout}"));
        check_doc(&format!("{args:?}"), &doc);
    }
    // The units the conversions promise.
    let perf: Value =
        serde_json::from_slice(&run(&["perf", "--mem-per-vcpu", "4M", "--json"]).stdout).unwrap();
    assert!(perf["get-avg-ns"].is_u64(), "{perf:#}");
    assert!(
        perf["iterations"][0]["dirty-memory-ns"].is_u64(),
        "{perf:#}"
    );
    let caps: Value = serde_json::from_slice(&run(&["caps", "--json"]).stdout).unwrap();
    assert!(caps["api-version"].is_u64(), "{caps:#}");
}

#[test]
fn send_and_receive_stream_progress_then_the_outcome() {
    let _g = kvm();
    let dir = scratch("send");
    let mut rx = Command::new(EXE)
        .args(["migrate", "receive", "--listen", "127.0.0.1:0", "--json"])
        .args(["--accept-timeout-s", "30", "--run-for-ms", "300"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rx_out = BufReader::new(rx.stdout.take().unwrap());
    let mut first = String::new();
    rx_out.read_line(&mut first).unwrap();
    let listening = check_lines("receive", &first);
    assert_eq!(listening[0]["event"], "listening", "{first}");
    let addr = listening[0]["address"].as_str().unwrap().to_string();
    // A directory where the plot should go: the migration completes, the plot cannot be
    // written, the statistics are printed all the same and the exit status says so.
    let not_a_file = dir.join("a-directory");
    std::fs::create_dir(&not_a_file).unwrap();
    let out = run(&[
        "migrate",
        "send",
        "--to",
        &addr,
        "--mem",
        "64M",
        "--working-set",
        "8M",
        "--warmup-ms",
        "100",
        "--json",
        "--plot",
        not_a_file.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    let lines = check_lines("send", &stdout);
    let ev = events(&lines);
    assert!(ev.contains(&"progress"), "{ev:?}");
    assert_eq!(ev.last(), Some(&"completed"), "{ev:?}");
    assert_eq!(
        ev.iter().filter(|e| **e != "progress").count(),
        1,
        "one outcome line: {ev:?}"
    );
    let done = lines.last().unwrap();
    assert_eq!(done["status"], "completed", "{done:#}");
    assert!(done["migration"]["downtime"].is_u64(), "{done:#}");
    assert!(done["migration"]["rounds"].as_array().unwrap().len() >= 2);
    let plot_error = done["plot-error"].as_str().unwrap_or_default();
    assert!(
        plot_error.starts_with("cannot write the plot to "),
        "{done:#}"
    );
    assert!(stderr.contains(plot_error), "{stderr}");
    for p in &lines[..lines.len() - 1] {
        assert!(p["elapsed-ms"].is_u64() && p["phase"].is_string(), "{p}");
    }

    // The receiver's lines, to its end.
    let mut rest = String::new();
    for l in rx_out.lines() {
        rest += &l.unwrap();
        rest.push('\n');
    }
    assert!(rx.wait().unwrap().success(), "{rest}");
    let rx_lines = check_lines("receive", &rest);
    let rx_ev = events(&rx_lines);
    assert_eq!(rx_ev.first(), Some(&"completed"), "{rx_ev:?}");
    assert_eq!(rx_ev.last(), Some(&"done"), "{rx_ev:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn send_without_a_receiver_ends_with_a_failed_line() {
    let _g = kvm();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run(&[
        "migrate",
        "send",
        "--to",
        &format!("127.0.0.1:{port}"),
        "--mem",
        "16M",
        "--working-set",
        "1M",
        "--warmup-ms",
        "0",
        "--json",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines = check_lines("send (no receiver)", &stdout);
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "failed", "{last}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("connection refused"),
        "{last}"
    );
}

#[test]
fn a_plot_into_a_missing_directory_is_refused_up_front() {
    // Refused when the arguments are checked: no guest booted, nothing on stdout.
    let out = run(&[
        "migrate",
        "send",
        "--to",
        "127.0.0.1:9",
        "--plot",
        "/nonexistent-dirtylog-dir/m.svg",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the directory /nonexistent-dirtylog-dir does not exist"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn demo_streams_progress_and_draws_the_migration() {
    let _g = kvm();
    let dir = scratch("demo");
    let out = run(&[
        "demo",
        "--mem",
        "64M",
        "--working-set",
        "8M",
        "--warmup-ms",
        "100",
        "--run-for-ms",
        "300",
        "--json",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let lines = check_lines("demo", &stdout);
    let ev = events(&lines);
    assert!(ev.contains(&"progress"), "{ev:?}");
    assert_eq!(ev.last(), Some(&"completed"), "{ev:?}");
    let done = lines.last().unwrap();
    assert_eq!(done["source"]["status"], "completed", "{done:#}");
    let svg_path = dir.join("migration.svg");
    assert_eq!(done["plot"], svg_path.to_str().unwrap(), "{done:#}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let limit = done["source"]["migration"]["downtime-limit"]
        .as_u64()
        .unwrap();
    let downtime = done["source"]["migration"]["downtime"].as_u64().unwrap();
    for t in [
        "pages per round (log scale)".to_string(),
        format!("limit {limit} ms"),
        format!("downtime measured {downtime} ms"),
    ] {
        assert!(svg.contains(&t), "no {t:?} in the SVG");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_prints_styled_json_lines_on_stderr() {
    let _g = kvm();
    let out = run(&[
        "run",
        "--kernel",
        "builtin:memtest",
        "--append",
        "mode=request mb=2 step=4096 rounds=1",
        "--mem",
        "64M",
        "--migrate",
        "on-request",
        "--json",
    ]);
    let stderr = text(&out.stderr);
    // JSON lines among the VMM's log lines.
    let json: String = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    let lines = check_lines("run", &json);
    let ev = events(&lines);
    assert_eq!(ev, ["migration", "done"], "{stderr}");
    assert!(lines[0]["downtime-ms"].is_u64(), "{}", lines[0]);
    assert!(lines[1]["downtime-ms-median"].is_u64(), "{}", lines[1]);
}

#[test]
fn the_style_checker_catches_what_it_should() {
    let mut errors = Vec::new();
    check_style(
        &serde_json::json!({"ok-key": 1, "bad_key": 2, "x": {"Camel": 3}, "downtime-ms": 1.5,
            "total-time": 2, "mbps": 1.5, "l": [{"aB": 1}]}),
        "",
        &mut errors,
    );
    assert_eq!(
        errors,
        [
            ".bad_key: key not kebab-case",
            ".downtime-ms: time 1.5 is not an integer",
            ".l[0].aB: key not kebab-case",
            ".x.Camel: key not kebab-case",
        ]
    );
}
