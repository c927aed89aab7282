//! The test kernels under QEMU 7.2 `-kernel` (benchmark side, not CI): the same command line as
//! `kernels/qemu_run.sh`, checking the serial output and QEMU's exit status
//! (`code << 1 | 1` through isa-debug-exit). Run with
//! `cargo test -p dirtylog-testvm --test kernels_qemu -- --ignored`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dirtylog_testvm::kernels;

const IGNORE: &str = "needs qemu-system-x86_64; run with --ignored";

/// One QEMU at a time: the host has few cores and every run is bounded in time.
static QEMU_LOCK: Mutex<()> = Mutex::new(());

struct Opts<'a> {
    append: &'a str,
    smp: u32,
    input: &'a [u8],
    initrd: Option<String>,
    /// Stop QEMU this long after the output contains this text (for kernels that never exit).
    stop_after: Option<(&'a str, Duration)>,
    timeout: Duration,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            append: "",
            smp: 2,
            input: b"",
            initrd: None,
            stop_after: None,
            timeout: Duration::from_secs(120),
        }
    }
}

struct Run {
    /// QEMU's exit status, or `None` when the test stopped it.
    status: Option<i32>,
    out: String,
    elf: PathBuf,
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dirtylog-kernels-qemu-{}-{test}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn stop(child: &mut Child) {
    // Ends only the QEMU this test started, by its handle.
    let _ = child.kill();
    let _ = child.wait();
}

fn qemu(kernel: &str, test: &str, o: Opts) -> Run {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests run QEMU with -accel kvm and need /dev/kvm"
    );
    let _guard = QEMU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch(test);
    let k = kernels::by_name(kernel).expect("kernel name");
    let elf = dir.join(format!("{kernel}.elf"));
    std::fs::write(&elf, k.elf).expect("write kernel");

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "kvm", "-m", "128M", "-smp"])
        .arg(o.smp.to_string())
        .arg("-kernel")
        .arg(&elf)
        .args(["-append", o.append])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .args(["-serial", "stdio"])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-no-reboot",
        ]);
    if let Some(initrd) = &o.initrd {
        cmd.args(["-initrd", initrd]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-system-x86_64 ({e}); {IGNORE}"));

    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(o.input).expect("write serial input");
    let out = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let out = Arc::clone(&out);
        let mut stdout = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().expect("output").extend_from_slice(&buf[..n]);
            }
        })
    };

    let start = Instant::now();
    let mut seen: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for qemu") {
            break status.code();
        }
        if let Some((text, linger)) = o.stop_after {
            let has = String::from_utf8_lossy(&out.lock().expect("output")).contains(text);
            if has && seen.is_none() {
                seen = Some(Instant::now());
            }
            if seen.is_some_and(|t| t.elapsed() >= linger) {
                stop(&mut child);
                break None;
            }
        }
        if start.elapsed() >= o.timeout {
            stop(&mut child);
            let got = String::from_utf8_lossy(&out.lock().expect("output")).into_owned();
            panic!(
                "{kernel}: QEMU still running after {:?}; output:\n{got}",
                o.timeout
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    reader.join().expect("reader thread");
    let out = String::from_utf8_lossy(&out.lock().expect("output")).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    Run { status, out, elf }
}

/// QEMU's status for a guest exit with `code`.
fn exited(code: i32) -> Option<i32> {
    Some((code << 1) | 1)
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn info_reports_loader_fw_cfg_and_module_and_exits_with_the_asked_status() {
    let dir = scratch("info-module");
    let module = dir.join("module.txt");
    std::fs::write(&module, b"hello-module\n").expect("module");
    let run = qemu(
        "info",
        "info",
        Opts {
            append: "exit=5 foo=bar",
            initrd: Some(format!("{} modarg", module.display())),
            ..Opts::default()
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<&str> = run.out.lines().collect();
    assert!(lines.len() >= 8, "{}", run.out);
    assert_eq!(
        lines[0],
        format!("cmdline: {} exit=5 foo=bar", run.elf.display()),
        "{}",
        run.out
    );
    assert_eq!(lines[1], "mem_lower: 639", "{}", run.out);
    let upper: u32 = lines[2]
        .strip_prefix("mem_upper: ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}", run.out));
    assert!(
        (100_000..=130_048).contains(&upper),
        "mem_upper {upper} KiB for 128 MiB"
    );
    let mmap: u32 = lines[3]
        .strip_prefix("mmap entries: ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}", run.out));
    assert!(mmap >= 2, "{}", run.out);
    assert_eq!(
        &lines[4..],
        [
            "cpus: 2",
            "ram: 128",
            "module: 13 bytes hello-module.",
            "rep outsb: ok",
            "exit: 5"
        ],
        "{}",
        run.out
    );
    assert_eq!(run.status, exited(5));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn info_without_module_exits_zero_by_default() {
    let run = qemu("info", "info-default", Opts::default());
    assert!(!run.out.contains("module:"), "{}", run.out);
    assert!(
        run.out.ends_with("ram: 128\nrep outsb: ok\nexit: 0\n"),
        "{}",
        run.out
    );
    assert_eq!(run.status, exited(0));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn info_rejects_a_bad_exit_value() {
    let run = qemu(
        "info",
        "info-bad",
        Opts {
            append: "exit=12x",
            ..Opts::default()
        },
    );
    assert_eq!(run.out, "bad argument: exit=\n");
    assert_eq!(run.status, exited(2));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn echo_echoes_serial_input_until_q() {
    let run = qemu(
        "echo",
        "echo",
        Opts {
            input: b"hello, dirtylog\nq",
            ..Opts::default()
        },
    );
    assert_eq!(run.out, "echo ready\nhello, dirtylog\nq");
    assert_eq!(run.status, exited(0));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn smp_brings_up_two_cpus() {
    let run = qemu("smp", "smp2", Opts::default());
    assert_eq!(run.out, "smp: 2 cpus expected\ncpu 1 up\nsmp: 2 cpus up\n");
    assert_eq!(run.status, exited(0));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn smp_brings_up_four_cpus() {
    let run = qemu(
        "smp",
        "smp4",
        Opts {
            smp: 4,
            ..Opts::default()
        },
    );
    let mut lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(lines.first(), Some(&"smp: 4 cpus expected"), "{}", run.out);
    assert_eq!(lines.last(), Some(&"smp: 4 cpus up"), "{}", run.out);
    let mut aps = lines.drain(1..lines.len() - 1).collect::<Vec<_>>();
    aps.sort_unstable();
    assert_eq!(aps, ["cpu 1 up", "cpu 2 up", "cpu 3 up"]);
    assert_eq!(run.status, exited(0));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn memtest_request_mode_waits_for_a_key_per_round() {
    let run = qemu(
        "memtest",
        "mt-request",
        Opts {
            append: "mode=request mb=1 rounds=2 step=64",
            input: b"\n\n",
            ..Opts::default()
        },
    );
    assert_eq!(
        run.out,
        "memtest: mode=request mb=1 rounds=2 step=64\n\
         Now migrate the VM, then press a key to continue...\n\
         memtest: round 1 ok\n\
         Now migrate the VM, then press a key to continue...\n\
         memtest: round 2 ok\n\
         memtest: PASS\n"
    );
    assert_eq!(run.status, exited(0));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn memtest_request_mode_blocks_without_input() {
    let run = qemu(
        "memtest",
        "mt-request-block",
        Opts {
            append: "mode=request mb=1 rounds=1",
            stop_after: Some(("press a key", Duration::from_secs(3))),
            ..Opts::default()
        },
    );
    assert_eq!(run.status, None, "{}", run.out);
    assert!(run.out.ends_with("to continue...\n"), "{}", run.out);
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn memtest_continuous_mode_follows_the_kvm_unit_tests_handshake() {
    let run = qemu(
        "memtest",
        "mt-continuous",
        Opts {
            append: "mode=continuous mb=1 rounds=3 step=64",
            input: b"\n\n",
            ..Opts::default()
        },
    );
    assert_eq!(
        run.out,
        "memtest: mode=continuous mb=1 rounds=3 step=64\n\
         Begin continuous migration\n\
         End continuous migration\n\
         End continuous migration (quiet)\n\
         memtest: PASS\n"
    );
    assert_eq!(run.status, exited(0));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn memtest_passes_mode_checks_every_dword() {
    let run = qemu(
        "memtest",
        "mt-passes",
        Opts {
            append: "mode=passes mb=1 rounds=3",
            ..Opts::default()
        },
    );
    assert_eq!(
        run.out,
        "memtest: mode=passes mb=1 rounds=3 step=4\n...\nmemtest: PASS\n"
    );
    assert_eq!(run.status, exited(0));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn memtest_reports_a_corrupted_dword() {
    let run = qemu(
        "memtest",
        "mt-corrupt",
        Opts {
            append: "mode=passes mb=2 rounds=1 step=256 corrupt=1",
            ..Opts::default()
        },
    );
    // Generation 0 at 0x500000 (the middle of 2 MiB at 4 MiB): 0x500000 ^ 0x9e3779b9.
    assert_eq!(
        run.out,
        "memtest: mode=passes mb=2 rounds=1 step=256\n\
         MISMATCH at 0x00500000 expected 0x9e6779b9 got 0x61988646\n"
    );
    assert_eq!(run.status, exited(1));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn memtest_rejects_a_working_set_beyond_memory() {
    let run = qemu(
        "memtest",
        "mt-big",
        Opts {
            append: "mb=200",
            ..Opts::default()
        },
    );
    assert_eq!(run.out, "memtest: mb=200 does not fit in memory\n");
    assert_eq!(run.status, exited(2));
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn spin_prints_once_and_never_exits() {
    let run = qemu(
        "spin",
        "spin",
        Opts {
            append: "mb=4",
            stop_after: Some(("spin\n", Duration::from_secs(3))),
            ..Opts::default()
        },
    );
    assert_eq!(run.status, None, "spin exited: {}", run.out);
    assert_eq!(run.out, "spin\n");
}

#[test]
#[ignore = "needs qemu-system-x86_64; run with --ignored"]
fn halt_prints_once_and_never_exits() {
    let run = qemu(
        "halt",
        "halt",
        Opts {
            stop_after: Some(("halt\n", Duration::from_secs(3))),
            ..Opts::default()
        },
    );
    assert_eq!(run.status, None, "halt exited: {}", run.out);
    assert_eq!(run.out, "halt\n");
}
