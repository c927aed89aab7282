//! `dirtylog dirty-rate`: each mode's estimate on a test guest of known rate, and on process
//! memory written by threads of known rate (`--source host`), within a stated tolerance of
//! what the writers' own counters say they dirtied in the same window; bad options refused
//! before anything boots; the `--json` document's shape. The guests need `/dev/kvm` (those
//! tests fail, never skip, without it).
//!
//! Tolerances (of the estimate's pages/s over the rate the guest's counters imply):
//! - page-sampling ±50%: a binomial sample; with 2048 pages sampled and about a third of
//!   them dirty, two standard deviations are about ±7%, and the passes' timing adds a little;
//! - dirty-bitmap and dirty-ring ±30%: exact counts, off only by writes at the window's edges
//!   (measured here: within 1%).

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

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("dirty-rate")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one JSON document of a successful `--json` run.
fn measure(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = run(&all);
    assert!(
        out.status.success(),
        "dirty-rate {args:?} failed: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    let stdout = text(&out.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not one JSON document: {e}\n{stdout}"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("no number {k:?} in {v:#}"))
}

/// The estimate's pages/s over what the guest's counters imply, asserted within `tol`; the
/// guest must have written enough for the comparison to mean something.
fn check_accuracy(doc: &Value, tol: f64) -> f64 {
    let g = &doc["guest"];
    let expected = f(g, "expected-dirty-pages-rate");
    assert!(
        expected >= 1000.0,
        "the guest dirtied too little to judge ({expected} pages/s): {doc:#}"
    );
    let ratio = f(doc, "dirty-pages-rate") / expected;
    assert!(
        (1.0 - tol..=1.0 + tol).contains(&ratio),
        "{} estimated {ratio:.3} of the guest's rate, outside ±{:.0}%: {doc:#}",
        doc["mode"],
        tol * 100.0
    );
    // The report's own accuracy says the same.
    assert!((f(g, "accuracy") - ratio).abs() < 1e-6, "{doc:#}");
    // MiB/s and pages/s agree.
    let mib = f(doc, "dirty-pages-rate") * f(doc, "page-size") / (1u64 << 20) as f64;
    assert!(
        (f(doc, "dirty-rate") - mib).abs() < 1e-6 * mib.max(1.0),
        "{doc:#}"
    );
    ratio
}

/// 2 vCPUs at 5000 pages/s each over 128 MiB: 10000 distinct pages a second of 32768, no page
/// written twice in the 1 s window.
const GUEST: [&str; 10] = [
    "--mem",
    "128M",
    "--working-set",
    "128M",
    "--vcpus",
    "2",
    "--dirty-rate",
    "5000",
    "--calc-time-ms",
    "1000",
];

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = GUEST.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn page_sampling_estimates_the_guests_rate() {
    let _g = kvm();
    let doc = measure(&with(&[
        "--mode",
        "page-sampling",
        "--sample-pages",
        "16384",
    ]));
    assert_eq!(doc["mode"], "page-sampling");
    // 128 MiB at 16384 per GiB.
    assert_eq!(doc["sampled-pages"], 2048);
    assert!(doc["dirty-samples"].as_u64().unwrap() > 0, "{doc:#}");
    let r = check_accuracy(&doc, 0.5);
    eprintln!("page-sampling: estimate/expected {r:.3}");
}

#[test]
fn dirty_bitmap_counts_the_guests_pages() {
    let _g = kvm();
    let doc = measure(&with(&["--mode", "dirty-bitmap"]));
    assert_eq!(doc["mode"], "dirty-bitmap");
    assert!(doc.get("sampled-pages").is_none(), "{doc:#}");
    let r = check_accuracy(&doc, 0.3);
    eprintln!("dirty-bitmap: estimate/expected {r:.3}");
}

#[test]
fn dirty_ring_tells_each_vcpus_rate() {
    let _g = kvm();
    let doc = measure(&with(&["--mode", "dirty-ring", "--ring-entries", "4096"]));
    assert_eq!(doc["mode"], "dirty-ring");
    let r = check_accuracy(&doc, 0.3);
    let vcpus = doc["vcpu-dirty-rate"].as_array().expect("per-vCPU rates");
    assert_eq!(vcpus.len(), 2, "{doc:#}");
    let mut sum = 0.0;
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["id"], i as u64);
        let (est, wrote) = (f(v, "dirty-pages-rate"), f(v, "guest-writes-rate"));
        assert!(wrote > 500.0, "vCPU {i} barely ran: {doc:#}");
        assert!(
            (0.7..=1.3).contains(&(est / wrote)),
            "vCPU {i}: {est} pages/s against {wrote} writes/s: {doc:#}"
        );
        sum += est;
    }
    assert!((sum - f(&doc, "dirty-pages-rate")).abs() < 1.0, "{doc:#}");
    eprintln!("dirty-ring: estimate/expected {r:.3}");
}

/// A guest rewriting a small working set as fast as it runs: the bitmap and the sample find
/// the working set, not the writes; the comparison knows it.
#[test]
fn a_rewritten_working_set_saturates_and_the_comparison_says_so() {
    let _g = kvm();
    for (mode, tol) in [("dirty-bitmap", 0.3), ("page-sampling", 0.5)] {
        let doc = measure(
            &[
                "--mode",
                mode,
                "--mem",
                "64M",
                "--working-set",
                "16M",
                "--dirty-rate",
                "max",
                "--calc-time-ms",
                "500",
                "--sample-pages",
                "16384",
            ][..if mode == "page-sampling" { 12 } else { 10 }],
        );
        let g = &doc["guest"];
        let ws_pages = (16 << 20) / 4096;
        assert!(
            g["writes"].as_u64().unwrap() > 2 * ws_pages,
            "the guest did not rewrite its working set: {doc:#}"
        );
        assert_eq!(g["expected-dirty-pages"], ws_pages, "{doc:#}");
        assert!(
            doc["dirty-pages"].as_u64().unwrap() <= 2 * ws_pages,
            "{doc:#}"
        );
        check_accuracy(&doc, tol);
    }
}

/// Process memory: two threads at 10000 pages/s each over 128 MiB (16384 pages a share, 10000
/// written in the window): page-sampling, and dirty-bitmap with each host method.
#[test]
fn host_memory_estimates_match_the_writer_threads() {
    let _g = kvm();
    let host = [
        "--source",
        "host",
        "--mem",
        "128M",
        "--working-set",
        "128M",
        "--vcpus",
        "2",
        "--dirty-rate",
        "10000",
        "--calc-time-ms",
        "1000",
    ];
    let mut runs: Vec<(Vec<&str>, f64)> = vec![(
        vec!["--mode", "page-sampling", "--sample-pages", "16384"],
        0.5,
    )];
    for m in ["async", "sync", "mprotect"] {
        runs.push((vec!["--mode", "dirty-bitmap", "--method", m], 0.3));
    }
    for (extra, tol) in runs {
        let mut args = host.to_vec();
        args.extend(extra.iter().copied());
        let doc = measure(&args);
        assert_eq!(doc["source"], "host");
        assert_eq!(doc["backing"], "anon");
        assert!(doc.get("guest").is_none(), "{doc:#}");
        // The writers' account stands where the guest's would.
        let mut doc = doc;
        let writers = doc["writers"].take();
        assert!(writers.is_object(), "{doc:#}");
        doc["guest"] = writers;
        let r = check_accuracy(&doc, tol);
        eprintln!("host {extra:?}: estimate/expected {r:.3}");
    }
}

#[test]
fn json_is_one_document_in_the_projects_style() {
    let _g = kvm();
    let args = [
        "--json",
        "--mode",
        "dirty-ring",
        "--mem",
        "64M",
        "--working-set",
        "32M",
        "--dirty-rate",
        "2000",
        "--calc-time-ms",
        "200",
    ];
    let out = run(&args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.starts_with("{\n  \"schema-version\": 1,"),
        "a pretty document, schema-version first: {stdout}"
    );
    let doc = measure(&args[1..]);
    assert_eq!(doc["schema-version"], 1);
    for k in [
        "mode",
        "source",
        "requested-calc-time",
        "calc-time",
        "page-size",
        "total-pages",
        "dirty-pages",
        "dirty-rate",
        "dirty-pages-rate",
        "vcpu-dirty-rate",
        "guest",
    ] {
        assert!(doc.get(k).is_some(), "no {k}: {doc:#}");
    }
    assert_eq!(doc["source"], "guest");
    assert_eq!(doc["requested-calc-time"], 200);
    assert!(doc["calc-time"].as_u64().unwrap() >= 200, "{doc:#}");
    assert_eq!(doc["total-pages"], (64 << 20) / 4096);
    for k in [
        "mem",
        "vcpus",
        "requested-pages-rate-per-vcpu",
        "working-set",
        "random",
        "writes",
        "writes-rate",
        "expected-dirty-pages",
        "expected-dirty-pages-rate",
        "accuracy",
    ] {
        assert!(doc["guest"].get(k).is_some(), "no guest.{k}: {doc:#}");
    }
    let mut errors = Vec::new();
    style(&doc, "", &mut errors);
    assert!(errors.is_empty(), "{errors:#?}\n{doc:#}");
}

/// docs/JSON.md: kebab-case keys all the way down; times (a `time`, `ms`, `us` or `ns` part)
/// are integers.
fn style(v: &Value, path: &str, errors: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{path}.{k}");
                let kebab = k.split('-').all(|w| {
                    !w.is_empty()
                        && w.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                });
                if !kebab {
                    errors.push(format!("{p}: not kebab-case"));
                }
                let time = k
                    .split('-')
                    .any(|w| matches!(w, "time" | "ms" | "us" | "ns"));
                if time && x.is_number() && !x.is_u64() {
                    errors.push(format!("{p}: time {x} is not an integer"));
                }
                style(x, &p, errors);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                style(x, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

/// Bad options: exit status 2 and a message naming the option, before any guest boots
/// (nothing on stdout).
#[test]
fn bad_options_are_refused_before_booting() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--calc-time-ms", "10"],
            "--calc-time-ms 10: use 50 to 60000",
        ),
        (
            &["--calc-time-ms", "60001"],
            "--calc-time-ms 60001: use 50 to 60000",
        ),
        (
            &["--sample-pages", "0"],
            "--sample-pages 0: use 128 to 16384",
        ),
        (
            &["--sample-pages", "16385"],
            "--sample-pages 16385: use 128 to 16384",
        ),
        (
            &["--mode", "dirty-bitmap", "--sample-pages", "512"],
            "--sample-pages applies to --mode page-sampling, not to --mode dirty-bitmap",
        ),
        (
            &["--ring-entries", "4096"],
            "--ring-entries applies to --mode dirty-ring, not to --mode page-sampling",
        ),
        (
            &["--mode", "dirty-ring", "--ring-entries", "1000"],
            "--ring-entries 1000: use a power of two from 1024 to 65536",
        ),
        (
            &["--mode", "dirty-ring", "--ring-entries", "512"],
            "--ring-entries 512: use a power of two from 1024 to 65536",
        ),
        (
            &["--mem", "64M", "--working-set", "128M"],
            "--working-set 128.0 MiB is larger than --mem 64.0 MiB",
        ),
        (
            &["--mem", "8K", "--working-set", "4K", "--vcpus", "2"],
            "--working-set 4096: at least one page per vCPU",
        ),
        (&["--vcpus", "0"], "--vcpus must be at least 1"),
        (
            &["--mem", "1000", "--working-set", "0"],
            "--mem 1000: use a positive multiple of 4 KiB",
        ),
        (&["--mode", "sampling"], "unknown mode \"sampling\""),
        (
            &["--dirty-rate", "fast"],
            "'fast' is not a number of pages per second",
        ),
        (&["--mem", "1Q"], "unknown size suffix 'Q'"),
        (
            &["--source", "host", "--mode", "dirty-ring"],
            "--mode dirty-ring needs per-vCPU dirty rings, which only KVM keeps",
        ),
        (
            &["--backing", "anon"],
            "--backing and --method apply to --source host",
        ),
        (
            &["--source", "host", "--no-huge-pages"],
            "--no-huge-pages applies to --source guest",
        ),
        (
            &["--method", "sync"],
            "--backing and --method apply to --source host",
        ),
        (
            &["--source", "host", "--method", "sync"],
            "--method applies to --mode dirty-bitmap (--mode page-sampling tracks nothing)",
        ),
        (
            &[
                "--source",
                "host",
                "--backing",
                "hugetlb",
                "--mem",
                "3M",
                "--working-set",
                "2M",
            ],
            "use multiples of the hugetlb page size (2.0 MiB)",
        ),
        (
            &[
                "--source",
                "host",
                "--mem",
                "64M",
                "--working-set",
                "4K",
                "--vcpus",
                "2",
            ],
            "at least one 4.0 KiB page per writer thread",
        ),
    ];
    for (args, want) in cases {
        let out = run(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(want),
            "{args:?}: {err:?} does not say {want:?}"
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {}",
            text(&out.stdout)
        );
    }
}

#[test]
fn help_explains_each_mode_and_its_cost() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    // Words as clap wraps them, joined again.
    let help = text(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for want in [
        "page-sampling:",
        "dirty-bitmap:",
        "dirty-ring:",
        "no write faults",
        "write fault",
        "KVM_CAP_DIRTY_LOG_RING",
        "--calc-time-ms",
        "--sample-pages",
    ] {
        assert!(
            help.contains(want),
            "--help does not mention {want:?}:\n{help}"
        );
    }
}
