//! Host memory on the command line (issue 11): `dirtylog caps` shows which host methods work
//! here, `dirtylog selftest --backend host` runs the protocol with every method, and the
//! options that mean nothing for host memory are refused. `caps` needs `/dev/kvm` (it fails,
//! never skips, without it).

use std::process::{Command, Output, Stdio};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_dirtylog");

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dirtylog")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn need_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: `dirtylog caps` probes KVM first; this test fails rather \
         than skips"
    );
}

#[test]
fn caps_table_lists_the_host_methods_and_async_works_here() {
    need_kvm();
    let out = run(&["caps"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    // The KVM table first, then the host section.
    let kvm = stdout.find("KVM_GET_API_VERSION").expect("the KVM table");
    let host = stdout
        .find("host memory tracking")
        .unwrap_or_else(|| panic!("no host section:\n{stdout}"));
    assert!(kvm < host, "{stdout}");
    let section = &stdout[host..];
    let row = |m: &str| -> Vec<&str> {
        section
            .lines()
            .find(|l| l.split_whitespace().next() == Some(m))
            .unwrap_or_else(|| panic!("no {m} row:\n{section}"))
            .split_whitespace()
            .collect()
    };
    let header = row("method");
    assert_eq!(
        &header[..4],
        ["method", "anon", "memfd", "hugetlb"],
        "{section}"
    );
    for m in ["async", "sync", "mprotect"] {
        let r = row(m);
        assert!(
            matches!(r[1], "yes" | "no") && matches!(r[2], "yes" | "no"),
            "{m}: {r:?}\n{section}"
        );
    }
    // Linux 6.18 here: WP_ASYNC and PAGEMAP_SCAN work on anonymous and memfd memory, and the
    // fallbacks on anonymous memory.
    assert_eq!(row("async")[1..3], ["yes", "yes"], "{section}");
    assert_eq!(row("sync")[1], "yes", "{section}");
    assert_eq!(row("mprotect")[1], "yes", "{section}");
    assert!(section.contains("best method here: async"), "{section}");
}

#[test]
fn caps_json_has_a_host_key_in_kebab_case() {
    need_kvm();
    let out = run(&["caps", "--json"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert!(v["api-version"].is_u64(), "the KVM keys stay: {v:#}");
    let host = &v["host"];
    assert!(host["uffd-features"].is_u64(), "{host:#}");
    assert!(host["free-huge-pages"].is_u64(), "{host:#}");
    assert!(host.get("uffd_features").is_none(), "{host:#}");
    let methods = host["methods"].as_array().expect("host.methods");
    let names: Vec<&str> = methods
        .iter()
        .filter_map(|m| m["method"].as_str())
        .collect();
    assert_eq!(names, ["async", "sync", "mprotect"], "{host:#}");
    for m in methods {
        let backings: Vec<&str> = m["backings"]
            .as_array()
            .expect("backings")
            .iter()
            .filter_map(|b| b["backing"].as_str())
            .collect();
        assert_eq!(backings, ["anon", "memfd", "hugetlb"], "{m:#}");
        for b in m["backings"].as_array().expect("backings") {
            assert!(b["works"].is_boolean(), "{b:#}");
            // A no says why.
            if b["works"] == false {
                assert!(b["why-not"].is_string(), "{b:#}");
            }
        }
    }
    assert_eq!(
        methods[0]["backings"][0]["works"], true,
        "async on anon: {host:#}"
    );
}

#[test]
fn selftest_on_host_memory_passes_with_every_method_and_mode() {
    let out = run(&[
        "selftest",
        "--backend",
        "host",
        "--method",
        "all",
        "--tracker",
        "all",
        "--iterations",
        "32",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for method in ["async", "sync", "mprotect"] {
        for mode in ["dirty-log", "clear-log"] {
            let head = format!("== {mode} on host memory ({method} method");
            assert!(stdout.contains(&head), "no {head:?} in:\n{stdout}");
        }
    }
    assert_eq!(stdout.matches("PASS").count(), 6, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert_eq!(
        stdout.matches("32 iterations").count(),
        6,
        "each run did its 32 iterations:\n{stdout}"
    );
    // Each run saw writes: "MODE: 32 iterations, dirty N clean ...", N > 0.
    for line in stdout
        .lines()
        .filter(|l| l.contains(": 32 iterations, dirty "))
    {
        let dirty: u64 = line
            .split("dirty ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no dirty count in {line:?}"));
        assert!(dirty > 0, "no page reported dirty: {line}");
    }
}

#[test]
fn options_meaningless_for_the_source_are_refused() {
    for (args, says) in [
        (
            &["selftest", "--backend", "host", "--tracker", "ring"][..],
            "no meaning with --backend host",
        ),
        (
            &["selftest", "--backend", "host", "--tracker", "ring:4096"][..],
            "no meaning with --backend host",
        ),
        (
            &["selftest", "--backend", "host", "--ring-entries", "1024"][..],
            "no meaning with --backend host",
        ),
        (
            &["selftest", "--method", "async"][..],
            "--backend host only",
        ),
        (
            &["selftest", "--backend", "kvm", "--backing", "memfd"][..],
            "--backend host only",
        ),
    ] {
        let out = run(args);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}{stderr}",
            text(&out.stdout)
        );
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            !text(&out.stdout).contains("Iteration"),
            "{args:?} refused before running anything"
        );
    }
}
