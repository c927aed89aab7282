//! The minimal PC with the project's own Multiboot kernels (built from
//! `crates/dirtylog-testvm/kernels/`): boot and Multiboot information, serial echo, the exit
//! port's status, SMP bring-up, and the guest's own memory check across back-to-back
//! migrations on a timer, on the guest's request (kvm-unit-tests' handshake) and
//! continuously; a guest that never polls anything and one halted with interrupts off,
//! migrated all the same. Needs `/dev/kvm` (fails, never skips, without it).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirtylog::TrackerKind;
use dirtylog_migrate::{ReceiveConfig, SendConfig, TimeoutPolicy};
use dirtylog_testvm::kernels;
use dirtylog_testvm::pc::{
    self, MigrateMode, PcConfig, PcExit, RunConfig, RunEnd, RunReport, SerialInput, Trigger,
};

/// Guest output, shared with the test.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Output {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn config(kernel: &str, append: &str) -> RunConfig {
    let k = kernels::by_name(kernel).unwrap_or_else(|| panic!("no kernel named {kernel}"));
    RunConfig {
        pc: PcConfig {
            mem_bytes: 64 << 20,
            smp: 1,
            tracker: TrackerKind::ClearLog,
            huge_pages: true,
        },
        kernel: k.elf.to_vec(),
        cmdline: format!("{kernel}.elf {append}"),
        initrd: None,
        migrate: MigrateMode::Off,
        max_migrations: None,
        send: SendConfig {
            // Small guests: switch over at once when rounds do not converge.
            max_rounds: 5,
            on_timeout: TimeoutPolicy::Switchover,
            timeout: Some(Duration::from_secs(30)),
            ..SendConfig::default()
        },
        receive: ReceiveConfig::default(),
        timeout: Some(Duration::from_secs(60)),
    }
}

fn run(cfg: &RunConfig, input: Option<&SerialInput>) -> (RunReport, String) {
    let _kvm = common::require_kvm();
    let out = Output::default();
    let log: pc::Log = Arc::new(|m: &str| eprintln!("pc: {m}"));
    let report = pc::run(cfg, Box::new(out.clone()), log, input, &mut |r| {
        eprintln!("migration {r:?}")
    })
    .unwrap_or_else(|e| panic!("the run failed: {e}\nguest output:\n{}", out.text()));
    (report, out.text())
}

fn status(r: &RunReport) -> u32 {
    match &r.end {
        RunEnd::Exit(PcExit::Status(s)) => *s,
        other => panic!("the guest did not exit through the exit port: {other:?}"),
    }
}

#[test]
fn info_sees_the_multiboot_information_and_fw_cfg() {
    let mut cfg = config("info", "exit=5 hello");
    cfg.pc.smp = 2;
    cfg.initrd = Some((b"module-bytes".to_vec(), "mod.bin".into()));
    let (r, out) = run(&cfg, None);
    assert!(out.contains("cmdline: info.elf exit=5 hello"), "{out}");
    assert!(out.contains("mem_lower: 639"), "{out}");
    // 64 MiB of RAM: 63 MiB above 1 MiB.
    assert!(out.contains(&format!("mem_upper: {}", 63 * 1024)), "{out}");
    assert!(out.contains("cpus: 2"), "{out}");
    assert!(out.contains("ram: 64"), "{out}");
    assert!(out.contains("module: 12 bytes module-bytes"), "{out}");
    // String I/O: one `rep outsb`, every byte to COM1's data port.
    assert!(out.contains("\nrep outsb: ok\n"), "{out}");
    // exit(5) → 5 << 1 | 1, as QEMU's isa-debug-exit.
    assert_eq!(status(&r), 11);
    assert_eq!(r.end, RunEnd::Exit(PcExit::Status(11)));
}

#[test]
fn echo_reads_the_serial_port() {
    let input = SerialInput::default();
    input.push(b"abc\nq");
    let (r, out) = run(&config("echo", ""), Some(&input));
    assert!(out.contains("echo ready"), "{out}");
    assert!(out.contains("abc"), "{out}");
    assert_eq!(status(&r), 1);
}

#[test]
fn smp_brings_up_every_vcpu() {
    let mut cfg = config("smp", "");
    cfg.pc.smp = 2;
    let (r, out) = run(&cfg, None);
    assert!(out.contains("smp: 2 cpus up"), "{out}");
    assert_eq!(status(&r), 1, "{out}");
}

/// The guest checks its own memory and TSC after every pass, across `n` migrations on a
/// timer, with each tracker; it runs for ever, so the run's time limit ends it, after passes
/// made on the last destination.
fn memtest_every(tracker: TrackerKind, n: u32, limit_s: u64) {
    let _kvm = common::require_kvm();
    let mut cfg = config("memtest", "mode=passes mb=4 step=4096 rounds=0");
    cfg.pc.tracker = tracker;
    cfg.migrate = MigrateMode::Every(Duration::from_millis(30));
    cfg.max_migrations = Some(n);
    cfg.timeout = Some(Duration::from_secs(limit_s));
    let out = Output::default();
    let log: pc::Log = Arc::new(|m: &str| eprintln!("pc: {m}"));
    let mut at_last = 0;
    let r = pc::run(&cfg, Box::new(out.clone()), log, None, &mut |m| {
        eprintln!("migration {m:?}");
        at_last = out.text().len();
    })
    .unwrap_or_else(|e| panic!("the run failed: {e}\nguest output:\n{}", out.text()));
    let text = out.text();
    assert_eq!(r.migrations.len() as u32, n, "{text}");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert!(r.migrations.iter().all(|m| m.trigger == Trigger::Timer));
    assert!(matches!(r.end, RunEnd::Timeout(_)), "{:?}: {text}", r.end);
    assert!(!text.contains("MISMATCH"), "{text}");
    assert!(!text.contains("tsc went backwards"), "{text}");
    let after = text[at_last..].matches('.').count();
    assert!(
        after >= 2,
        "{after} passes after the last migration: {text}"
    );
}

#[test]
fn memtest_survives_twenty_migrations_clear_log() {
    memtest_every(TrackerKind::ClearLog, 20, 20);
}

#[test]
fn memtest_survives_migrations_dirty_log() {
    memtest_every(TrackerKind::DirtyLog, 5, 8);
}

#[test]
fn memtest_survives_migrations_ring() {
    memtest_every(TrackerKind::Ring { entries: 16384 }, 5, 8);
}

#[test]
fn migrates_on_the_guests_request() {
    let mut cfg = config("memtest", "mode=request mb=4 step=4096 rounds=3");
    cfg.migrate = MigrateMode::OnRequest;
    let (r, out) = run(&cfg, None);
    assert_eq!(r.migrations.len(), 3, "{out}");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert!(r.migrations.iter().all(|m| m.trigger == Trigger::Request));
    assert!(out.contains("memtest: PASS"), "{out}");
    assert_eq!(status(&r), 1, "{out}");
}

#[test]
fn migrates_continuously_between_begin_and_end() {
    let mut cfg = config("memtest", "mode=continuous mb=4 step=4096 rounds=200");
    cfg.migrate = MigrateMode::OnRequest;
    let (r, out) = run(&cfg, None);
    assert!(!r.migrations.is_empty(), "{out}");
    assert!(r
        .migrations
        .iter()
        .all(|m| m.trigger == Trigger::Continuous));
    assert!(out.contains("memtest: PASS"), "{out}");
    assert_eq!(status(&r), 1, "{out}");
}

/// A migration that gives up (here: no downtime is short enough and there is no time to
/// converge, `--on-timeout cancel`) leaves the guest running where it was, and the run goes
/// on.
#[test]
fn a_failed_migration_leaves_the_guest_running() {
    let _kvm = common::require_kvm();
    let mut cfg = config("memtest", "mode=passes mb=4 step=4096 rounds=0");
    cfg.migrate = MigrateMode::Every(Duration::from_millis(100));
    cfg.max_migrations = Some(2);
    // A guest this small fits any real limit at the first harvest (the bulk pass skips the
    // memory it never touched), and a migration that fits switches over whatever the clock.
    cfg.send.downtime_limit = Duration::ZERO;
    cfg.send.timeout = Some(Duration::from_micros(1));
    cfg.send.on_timeout = TimeoutPolicy::Cancel;
    cfg.timeout = Some(Duration::from_secs(2));
    let out = Output::default();
    let log: pc::Log = Arc::new(|m: &str| eprintln!("pc: {m}"));
    let r = pc::run(&cfg, Box::new(out.clone()), log, None, &mut |_| {})
        .unwrap_or_else(|e| panic!("the run failed: {e}"));
    let text = out.text();
    assert!(r.migrations.is_empty(), "{:?}", r.migrations);
    assert!(r.failures.len() >= 2, "{:?}", r.failures);
    assert!(matches!(r.end, RunEnd::Timeout(_)), "{:?}", r.end);
    assert!(!text.contains("MISMATCH"), "{text}");
    assert!(text.matches('.').count() > 10, "the guest stopped: {text}");
}

#[test]
fn a_guest_that_never_polls_is_migrated() {
    for kernel in ["spin", "halt"] {
        let mut cfg = config(kernel, "mb=4");
        cfg.pc.smp = 2;
        cfg.migrate = MigrateMode::Every(Duration::from_millis(50));
        cfg.max_migrations = Some(4);
        cfg.timeout = Some(Duration::from_secs(3));
        let (r, out) = run(&cfg, None);
        assert_eq!(r.migrations.len(), 4, "{kernel}: {out}");
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert!(matches!(r.end, RunEnd::Timeout(_)), "{kernel}: {:?}", r.end);
        assert!(out.starts_with(kernel), "{kernel}: {out}");
    }
}

/// A PC's whole state — every vCPU, the in-kernel irqchip, PIT and clock, the UART with
/// queued input, fw_cfg — saved from a running guest with a second vCPU waiting for SIPI, restored into a fresh PC and saved
/// again is the same, but for the time fields (TSC, kvmclock, the PIT's load time), which
/// never go back.
#[test]
fn state_round_trips_through_a_fresh_pc() {
    use dirtylog_kvm::vm_state::VmSnapshot;
    use dirtylog_migrate::{DeviceState, VcpuRestore, Vcpus};
    use dirtylog_testvm::pc::migrate::KVM_VM_DEVICE;
    use dirtylog_testvm::pc::Pc;
    use dirtylog_testvm::VcpuSnapshot;

    let _kvm = common::require_kvm();
    let cfg = PcConfig {
        mem_bytes: 32 << 20,
        smp: 2,
        tracker: TrackerKind::ClearLog,
        huge_pages: true,
    };
    let out = Output::default();
    let sink = out.clone();
    let console: pc::Console = Arc::new(move |b| {
        sink.0.lock().unwrap().push(b);
    });
    let log: pc::Log = Arc::new(|m: &str| eprintln!("pc: {m}"));
    let src = Pc::new(&cfg, console.clone(), log.clone()).unwrap();
    // vCPU 0 writing memory for ever, vCPU 1 waiting for INIT/SIPI, input queued.
    let spin = kernels::by_name("spin").unwrap();
    src.boot(spin.elf, "spin.elf mb=2", None).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !out.text().contains("spin") {
        assert!(std::time::Instant::now() < deadline, "{}", out.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    src.serial_input(b"queued");
    Vcpus::pause(&src).unwrap();
    let vcpus = Vcpus::save_state(&src).unwrap();
    let devices = src.save_devices().unwrap();
    assert_eq!(vcpus.len(), 2);
    let names: Vec<&str> = devices.iter().map(|d| d.name()).collect();
    for want in ["serial0", "fw_cfg", KVM_VM_DEVICE] {
        assert!(names.contains(&want), "{names:?}");
    }

    let dst = Pc::new(&cfg, console, log).unwrap();
    for (i, blob) in vcpus.iter().enumerate() {
        dst.restore_state(i as u32, blob).unwrap();
    }
    for d in &devices {
        dst.restore_device(d.name(), d.version(), d.bytes())
            .unwrap();
    }
    let again = Vcpus::save_state(&dst).unwrap();
    let devices_again = dst.save_devices().unwrap();
    for (a, b) in vcpus.iter().zip(&again) {
        let (a, b) = (
            VcpuSnapshot::decode(a).unwrap(),
            VcpuSnapshot::decode(b).unwrap(),
        );
        assert_eq!(a.without_time(), b.without_time(), "vCPU {}", a.vcpu_id);
        let tsc = |s: &VcpuSnapshot| s.msr(0x10).expect("IA32_TSC saved");
        assert!(tsc(&b) >= tsc(&a), "the TSC went back");
    }
    assert_eq!(devices.len(), devices_again.len());
    for (a, b) in devices.iter().zip(&devices_again) {
        assert_eq!((a.name(), a.version()), (b.name(), b.version()));
        if a.name() == KVM_VM_DEVICE {
            let (a, b) = (
                VmSnapshot::decode(a.bytes()).unwrap(),
                VmSnapshot::decode(b.bytes()).unwrap(),
            );
            assert_eq!(a.without_time(), b.without_time());
            assert!(b.clock.clock >= a.clock.clock, "kvmclock went back");
        } else {
            assert_eq!(a.bytes(), b.bytes(), "device {}", a.name());
        }
    }
    src.shutdown().unwrap();
    dst.shutdown().unwrap();
}
