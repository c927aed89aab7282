//! `dirtylog snapshot create|restore|verify|merge|info` end to end, as separate processes:
//! round trips in every mode (a chain of a full snapshot and ≥ 3 diffs, restored and run on;
//! after `merge` too; `--lazy`), bad option combinations refused before any work, and the
//! fault harness: `create` killed (SIGKILL) at 20 points, truncated and bit-flipped members, a
//! missing or foreign parent, a full disk (a small tmpfs). Needs `/dev/kvm` (fails, never
//! skips, without it) and root for the tmpfs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_dirtylog");

/// One KVM test at a time (2 cores).
fn kvm() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: these tests need KVM; they fail rather than skip"
    );
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh directory for this test's files.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dirtylog-snapshot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn dirtylog(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Both streams, for assertion messages.
fn both(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// The JSON lines of `out`'s stdout (other lines, such as a kernel's serial output in text
/// mode, are not expected with --json).
fn lines(o: &Output) -> Vec<Value> {
    text(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}\n{}", both(o)))
        })
        .collect()
}

/// Every key kebab-case and every time an integer, `schema-version` 1 at the top.
fn check_style(v: &Value, path: &str) {
    if path.is_empty() {
        assert_eq!(v["schema-version"], 1, "{v}");
    }
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                assert!(
                    !k.is_empty()
                        && k.split('-').all(|w| !w.is_empty()
                            && w.chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())),
                    "{path}.{k}: key not kebab-case in {v}"
                );
                let time = k
                    .split('-')
                    .any(|w| matches!(w, "ms" | "us" | "ns" | "time" | "downtime"));
                assert!(
                    !(time && x.is_number() && !x.is_u64()),
                    "{path}.{k}: time {x} is not an integer"
                );
                check_style(x, &format!("{path}.{k}"));
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| check_style(x, &format!("{path}[{i}]"))),
        _ => {}
    }
}

/// The small harness guest: 64 MiB, a 4 MiB working set swept by 2 vCPUs.
const GUEST: &[&str] = &["--mem", "64M", "--working-set", "4M", "--warmup-ms", "200"];

/// `snapshot create DIR` with `extra` and the small guest, as JSON lines; asserts success.
fn create(dir: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["snapshot", "create", p(dir), "--json"];
    args.extend_from_slice(extra);
    let o = dirtylog(&args);
    assert!(o.status.success(), "create {extra:?} failed: {}", both(&o));
    let l = lines(&o);
    for v in &l {
        check_style(v, "");
    }
    assert_eq!(l.last().unwrap()["event"], "completed", "{}", both(&o));
    l
}

/// `snapshot restore DIR` for `run_ms`; asserts the chain was accepted, its memory matched the
/// snapshot's hash, and the guest made progress afterwards.
fn restore_runs(dir: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["snapshot", "restore", p(dir), "--run-ms", "600", "--json"];
    args.extend_from_slice(extra);
    let o = dirtylog(&args);
    assert!(o.status.success(), "restore {dir:?} failed: {}", both(&o));
    let l = lines(&o);
    for v in &l {
        check_style(v, "");
    }
    let restored = l
        .iter()
        .find(|v| v["event"] == "restored")
        .unwrap_or_else(|| panic!("no restored event: {}", both(&o)));
    assert_eq!(restored["memory-checked"], true, "{restored}");
    assert!(
        l.iter().any(|v| v["event"] == "sample"),
        "no samples: {}",
        both(&o)
    );
    let done = l.last().unwrap();
    assert_eq!(done["event"], "done", "{}", both(&o));
    assert_eq!(
        done["advanced"],
        true,
        "the guest did not run on: {}",
        both(&o)
    );
    assert!(
        l.iter()
            .all(|v| !v["line"].as_str().is_some_and(|s| s.contains("MISMATCH"))),
        "the restored kernel found wrong memory: {}",
        both(&o)
    );
    l
}

/// `snapshot verify DIR`: (exit status, stdout+stderr).
fn verify(dir: &Path) -> (Option<i32>, String) {
    let o = dirtylog(&["snapshot", "verify", p(dir)]);
    (o.status.code(), both(&o))
}

fn assert_verifies(dir: &Path) {
    let (code, out) = verify(dir);
    assert_eq!(code, Some(0), "verify {dir:?}: {out}");
}

/// A chain of a full snapshot and 3 diffs in `mode`, each member restored and run; then merged,
/// and the merged snapshot restored and run.
fn round_trip(mode: &str) {
    let _g = kvm();
    let d = scratch(&format!("round-trip-{mode}"));
    let chain = d.join("chain");
    let mut args = vec!["--mode", mode, "--count", "4", "--every-ms", "200"];
    args.extend_from_slice(GUEST);
    let l = create(&chain, &args);
    let members: Vec<&Value> = l.iter().filter(|v| v["event"] == "snapshot").collect();
    assert_eq!(members.len(), 4, "{l:?}");
    assert_eq!(members[0]["kind"], "full");
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m["mode"], mode);
        assert_eq!(
            Path::new(m["path"].as_str().unwrap()),
            chain.join(i.to_string())
        );
        assert!(m["pages"].as_u64().unwrap() > 0, "{m}");
        if i > 0 {
            assert_eq!(m["kind"], "diff", "{m}");
        }
    }
    // The diffs carry the dirtied pages, not the guest.
    let full = members[0]["pages"].as_u64().unwrap();
    assert!(
        members[1..]
            .iter()
            .all(|m| m["pages"].as_u64().unwrap() < full),
        "{members:?}"
    );
    for i in 0..4 {
        assert_verifies(&chain.join(i.to_string()));
    }
    // Any member restores, not just the tip.
    restore_runs(&chain.join("1"), &[]);
    let r = restore_runs(&chain.join("3"), &[]);
    let restored = r.iter().find(|v| v["event"] == "restored").unwrap();
    assert_eq!(
        restored["members"].as_array().unwrap().len(),
        4,
        "{restored}"
    );
    // Merged: one full member restoring the same state.
    let merged = d.join("merged");
    let o = dirtylog(&[
        "snapshot",
        "merge",
        p(&chain.join("3")),
        "--into",
        p(&merged),
    ]);
    assert!(o.status.success(), "merge: {}", both(&o));
    // The merged snapshot starts a chain: INTO/0.
    let merged = merged.join("0");
    assert_verifies(&merged);
    let info = dirtylog(&["snapshot", "info", p(&merged), "--json"]);
    assert!(info.status.success(), "{}", both(&info));
    let iv: Value = serde_json::from_slice(&info.stdout).unwrap();
    check_style(&iv, "");
    let tip = dirtylog(&["snapshot", "info", p(&chain.join("3")), "--json"]);
    let tv: Value = serde_json::from_slice(&tip.stdout).unwrap();
    let digests = |v: &Value| -> Vec<String> {
        v["regions"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r["memory-xxh3"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(!digests(&iv).is_empty(), "{iv:#}");
    assert_eq!(
        digests(&iv),
        digests(&tv),
        "the merged snapshot's memory is not the tip's:\n{iv:#}\n{tv:#}"
    );
    let r = restore_runs(&merged, &[]);
    let restored = r.iter().find(|v| v["event"] == "restored").unwrap();
    assert_eq!(
        restored["members"].as_array().unwrap().len(),
        1,
        "{restored}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn round_trip_stop() {
    round_trip("stop");
}

#[test]
fn round_trip_live() {
    round_trip("live");
}

#[test]
fn round_trip_background() {
    round_trip("background");
}

#[test]
fn lazy_restore_runs_the_guest_on() {
    let _g = kvm();
    let d = scratch("lazy");
    let chain = d.join("chain");
    let mut args = vec!["--count", "3", "--every-ms", "200"];
    args.extend_from_slice(GUEST);
    create(&chain, &args);
    let r = restore_runs(&chain.join("2"), &["--lazy"]);
    let restored = r.iter().find(|v| v["event"] == "restored").unwrap();
    assert_eq!(restored["lazy"], true, "{restored}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `create --parent` continues a chain in another process: restored, run, diffed; the
/// diffs restore, for the harness guest and for a kernel.
fn continue_chain(name: &str, guest: &[&str]) {
    let _g = kvm();
    let d = scratch(name);
    let chain = d.join("chain");
    let mut args = vec!["--count", "2", "--every-ms", "200"];
    args.extend_from_slice(guest);
    create(&chain, &args);
    let l = create(
        &chain,
        &[
            "--parent",
            p(&chain.join("1")),
            "--run-ms",
            "300",
            "--count",
            "2",
            "--every-ms",
            "200",
        ],
    );
    let members: Vec<&Value> = l.iter().filter(|v| v["event"] == "snapshot").collect();
    assert_eq!(members.len(), 2, "{l:?}");
    for (m, n) in members.iter().zip(["2", "3"]) {
        assert_eq!(m["kind"], "diff", "{m}");
        assert_eq!(Path::new(m["path"].as_str().unwrap()), chain.join(n));
    }
    // A diff in another directory, against a parent elsewhere.
    let other = d.join("other");
    let l = create(
        &other,
        &["--parent", p(&chain.join("3")), "--run-ms", "200"],
    );
    let m = l.iter().find(|v| v["event"] == "snapshot").unwrap();
    assert_eq!(m["kind"], "diff", "{m}");
    assert_eq!(Path::new(m["path"].as_str().unwrap()), other.join("0"));
    assert_verifies(&other.join("0"));
    let r = restore_runs(&other.join("0"), &[]);
    let restored = r.iter().find(|v| v["event"] == "restored").unwrap();
    assert_eq!(
        restored["members"].as_array().unwrap().len(),
        5,
        "{restored}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn parent_continues_a_chain_of_the_test_guest() {
    continue_chain("parent-guest", GUEST);
}

#[test]
fn parent_continues_a_chain_of_a_kernel() {
    continue_chain("parent-kernel", KERNEL);
}

#[test]
fn bad_option_combinations_are_refused_before_any_work() {
    let d = scratch("options");
    let chain = d.join("chain");
    let refused = |args: &[&str], why: &str| {
        let t = Instant::now();
        let o = dirtylog(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", both(&o));
        let err = text(&o.stderr);
        assert!(err.contains(why), "{args:?}: wanted {why:?}: {}", both(&o));
        // Refused before a guest booted (which takes far longer than parsing).
        assert!(o.stdout.is_empty(), "{args:?}: {}", both(&o));
        let _ = t;
    };
    refused(
        &["snapshot", "create", p(&chain), "--every-ms", "100"],
        "--every-ms",
    );
    refused(
        &[
            "snapshot",
            "create",
            p(&chain),
            "--count",
            "1",
            "--every-ms",
            "100",
        ],
        "--count 2 or more",
    );
    refused(
        &["snapshot", "create", p(&chain), "--run-ms", "100"],
        "needs --parent",
    );
    refused(
        &[
            "snapshot",
            "create",
            p(&chain),
            "--parent",
            p(&d),
            "--kernel",
            "builtin:spin",
        ],
        "--kernel",
    );
    refused(
        &["snapshot", "create", p(&chain), "--count", "0"],
        "--count",
    );
    refused(
        &["snapshot", "create", p(&chain), "--mode", "sometimes"],
        "sometimes",
    );
    // A directory that holds a chain already.
    std::fs::create_dir_all(chain.join("0")).unwrap();
    refused(&["snapshot", "create", p(&chain)], "already holds a chain");
    // A file where the directory should be.
    let file = d.join("file");
    std::fs::write(&file, b"x").unwrap();
    refused(&["snapshot", "create", p(&file)], "not a directory");
    // Nothing to restore.
    let o = dirtylog(&["snapshot", "restore", p(&d.join("nothing"))]);
    assert_eq!(o.status.code(), Some(1), "{}", both(&o));
    assert!(text(&o.stdout).contains("nothing ran"), "{}", both(&o));
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------
// Faults

/// Copy a chain directory (sparse files stay sparse).
fn copy_dir(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .args(["-a", "--sparse=always", p(from), p(to)])
        .output()
        .unwrap();
    assert!(o.status.success(), "cp: {}", both(&o));
}

/// A member's memory file with data (the biggest), for corrupting.
fn data_file(member: &Path) -> PathBuf {
    std::fs::read_dir(member)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|x| x == "raw"))
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap_or_else(|| panic!("no mem-*.raw in {member:?}"))
}

/// `path` with `.` and `..` resolved lexically (the library names members as reached from the
/// tip: `chain/2/../1`).
fn normalize(path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Whether `msg` names `member` (as a path, however reached).
fn names(msg: &str, member: &Path) -> bool {
    msg.split(|c: char| c.is_whitespace() || matches!(c, ':' | ',' | '(' | ')' | '"' | '\''))
        .any(|w| !w.is_empty() && normalize(w) == member)
}

/// A restore of `tip` is refused naming `member`, and no guest ran; verify refuses too.
fn refused_naming(tip: &Path, member: &Path, what: &str) {
    let o = dirtylog(&["snapshot", "restore", p(tip), "--run-ms", "100", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{what}: {}", both(&o));
    let l = lines(&o);
    assert!(
        l.iter()
            .all(|v| v["event"] != "restored" && v["event"] != "sample"),
        "{what}: a guest ran: {}",
        both(&o)
    );
    let last = l.last().unwrap();
    assert_eq!(last["event"], "failed", "{what}: {}", both(&o));
    let err = last["error"].as_str().unwrap();
    assert!(
        names(err, member),
        "{what}: the error does not name {member:?}: {err}"
    );
    let (code, out) = verify(tip);
    assert_eq!(code, Some(1), "{what}: verify: {out}");
    assert!(
        names(&out, member),
        "{what}: verify does not name {member:?}: {out}"
    );
}

#[test]
fn damaged_chains_are_refused_naming_the_member() {
    let _g = kvm();
    let d = scratch("damaged");
    let good = d.join("good");
    let mut args = vec!["--count", "3", "--every-ms", "150"];
    args.extend_from_slice(GUEST);
    create(&good, &args);
    for i in 0..3 {
        assert_verifies(&good.join(i.to_string()));
    }

    // A truncated member file (a diff in the middle of the chain).
    let c = d.join("truncated");
    copy_dir(&good, &c);
    let f = data_file(&c.join("1"));
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    refused_naming(&c.join("2"), &c.join("1"), "truncated");
    // The members before it are unharmed.
    assert_verifies(&c.join("0"));

    // One bit flipped in the full snapshot's memory (in its first page with data).
    let c = d.join("bitflip");
    copy_dir(&good, &c);
    let f = data_file(&c.join("0"));
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes
        .iter()
        .position(|&b| b != 0)
        .expect("a page with data");
    bytes[at] ^= 0x10;
    std::fs::write(&f, &bytes).unwrap();
    refused_naming(&c.join("2"), &c.join("0"), "bit flip");

    // A bit flipped in a diff's manifest (its parent's hash no longer names it, or it no
    // longer parses).
    let c = d.join("manifest");
    copy_dir(&good, &c);
    let m = c.join("1").join("manifest.json");
    let mut bytes = std::fs::read(&m).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&m, &bytes).unwrap();
    refused_naming(&c.join("2"), &c.join("1"), "manifest bit flip");

    // The parent missing.
    let c = d.join("missing");
    copy_dir(&good, &c);
    std::fs::remove_dir_all(c.join("1")).unwrap();
    refused_naming(&c.join("2"), &c.join("1"), "missing parent");

    // A different parent in its place: another chain's member of the same number.
    let other = d.join("other");
    create(&other, &args);
    let c = d.join("foreign");
    copy_dir(&good, &c);
    std::fs::remove_dir_all(c.join("1")).unwrap();
    copy_dir(&other.join("1"), &c.join("1"));
    refused_naming(&c.join("2"), &c.join("1"), "different parent");
    // The intact chain still restores.
    restore_runs(&good.join("2"), &[]);
    let _ = std::fs::remove_dir_all(&d);
}

/// The numbered members of `dir`, in order.
fn members(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Leftovers of killed writes (`.N.tmp-PID`).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// A kernel on the minimal PC: it rewrites and checks 4 MiB pass after pass (a restore with
/// wrong memory prints MISMATCH).
const KERNEL: &[&str] = &[
    "--kernel",
    "builtin:memtest",
    "--append",
    "mode=passes mb=4 step=4096",
    "--mem",
    "64M",
    "--vcpus",
    "1",
    "--warmup-ms",
    "100",
];

#[test]
fn create_killed_at_20_points_leaves_the_chain_usable() {
    let _g = kvm();
    let d = scratch("killed");
    let mut run_args: Vec<String> = [
        "snapshot",
        "create",
        "DIR",
        "--count",
        "4",
        "--every-ms",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run_args.extend(GUEST.iter().map(|s| s.to_string()));
    // The child, its JSON lines arriving on a channel.
    let spawn = |dir: &Path| {
        let mut args = run_args.clone();
        args[2] = p(dir).to_string();
        let mut child = Command::new(EXE)
            .args(&args)
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(out) {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    };
    // Wait until `n` members were reported (or the child ended).
    let members_reported = |rx: &std::sync::mpsc::Receiver<String>, n: usize| {
        let mut seen = 0;
        while seen < n {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.contains("\"event\":\"snapshot\"") => seen += 1,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    };
    // A whole run, timed up to its first member (boot, warm-up, the full snapshot).
    let t = Instant::now();
    let whole = d.join("whole");
    let (mut child, rx) = spawn(&whole);
    assert!(members_reported(&rx, 1), "the unkilled run wrote no member");
    let first = t.elapsed();
    assert!(child.wait().unwrap().success(), "the unkilled run failed");
    assert_eq!(members(&whole), vec![0, 1, 2, 3]);
    // 20 points: 5 from the start, over the boot and the full snapshot's write; then 5 after
    // each of the members 1, 2 and 3 was reported, over the wait and the next member's write
    // (`--every-ms 150`).
    let points: Vec<(usize, Duration)> = (1..=5u32)
        .map(|i| (0, first.mul_f64(0.4 + 0.6 * f64::from(i) / 5.0)))
        .chain((1..=3).flat_map(|m| (0..5u64).map(move |i| (m, Duration::from_millis(i * 35)))))
        .collect();
    let mut outcomes = Vec::new();
    for (k, &(after, delay)) in (1..).zip(&points) {
        let dir = d.join(format!("k{k}"));
        let (mut child, rx) = spawn(&dir);
        let started = Instant::now();
        members_reported(&rx, after);
        std::thread::sleep(delay);
        let delay = started.elapsed();
        // SIGKILL (Child::kill); it may have finished already at the last points.
        let _ = child.kill();
        let _ = child.wait();
        let found = members(&dir);
        let left = leftovers(&dir);
        // Complete members are numbered 0.. without gaps, and each verifies.
        assert_eq!(
            found,
            (0..found.len() as u64).collect::<Vec<_>>(),
            "kill {k} after {delay:?}: members {found:?}"
        );
        for m in &found {
            let (code, out) = verify(&dir.join(m.to_string()));
            assert_eq!(code, Some(0), "kill {k} after {delay:?}: member {m}: {out}");
        }
        // A following create in the same DIR works: the first member, or a diff continuing
        // the chain from its last member.
        let mut args: Vec<String> = vec![
            "snapshot".into(),
            "create".into(),
            p(&dir).into(),
            "--json".into(),
        ];
        match found.last() {
            None => args.extend(GUEST.iter().map(|s| s.to_string())),
            Some(last) => args.extend([
                "--parent".to_string(),
                p(&dir.join(last.to_string())).to_string(),
                "--run-ms".into(),
                "100".into(),
            ]),
        }
        let o = Command::new(EXE)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "kill {k} after {delay:?} (members {found:?}, leftovers {left:?}): the next create \
             failed: {}",
            both(&o)
        );
        let next = found.last().map_or(0, |l| l + 1);
        assert_eq!(members(&dir).last(), Some(&next), "kill {k}");
        assert_verifies(&dir.join(next.to_string()));
        assert!(
            leftovers(&dir).is_empty(),
            "kill {k}: the next create left {:?}",
            leftovers(&dir)
        );
        outcomes.push((delay, found.len(), left.len()));
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!(
        "unkilled run: first member at {first:?}; (kill delay, complete members, leftovers): \
         {outcomes:?}"
    );
    // The points covered the writes: some kills left no member, some a partial chain.
    assert!(outcomes.iter().any(|o| o.1 == 0), "{outcomes:?}");
    assert!(outcomes.iter().any(|o| o.1 > 0 && o.1 < 4), "{outcomes:?}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A tmpfs mounted for the test, unmounted however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                p(dir),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mounting a tmpfs (this test needs root): {}",
            both(&o)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_earlier_members_stay_usable() {
    let _g = kvm();
    let d = scratch("full");
    let mnt = d.join("mnt");
    let fs = Tmpfs::mount(&mnt, "8m");
    let chain = mnt.join("chain");
    // A 3 MiB working set swept fast: each member carries up to 3 MiB, so the 8 MiB fill
    // after a few members.
    let o = dirtylog(&[
        "snapshot",
        "create",
        p(&chain),
        "--json",
        "--count",
        "12",
        "--every-ms",
        "100",
        "--mem",
        "64M",
        "--working-set",
        "3M",
        "--warmup-ms",
        "200",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", both(&o));
    let l = lines(&o);
    let last = l.last().unwrap();
    assert_eq!(last["event"], "failed", "{}", both(&o));
    let err = last["error"].as_str().unwrap();
    assert!(err.contains("no space left"), "{err}");
    let written = last["members-written"].as_u64().unwrap();
    assert!(written >= 1, "not even the first member fit: {}", both(&o));
    assert_eq!(members(&chain).len() as u64, written, "{}", both(&o));
    for m in members(&chain) {
        assert_verifies(&chain.join(m.to_string()));
    }
    // The last complete member restores (nothing runs from the tmpfs but the reads).
    restore_runs(&chain.join((written - 1).to_string()), &[]);
    drop(fs);
    let _ = std::fs::remove_dir_all(&d);
}
