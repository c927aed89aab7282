//! A VM composed of parts: device sections end to end, a target that does not know a device,
//! migrations over Unix sockets, and a VM whose vCPUs cannot be throttled.

mod common;

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use dirtylog_migrate::soft::SoftVm;
use dirtylog_migrate::wire::{Decoder, Message};
use dirtylog_migrate::{
    receive, receive_on, send, send_on, transport, Address, AutoConverge, DeviceSection,
    DeviceState, DirtyTracker, MigrateError, MigrationSource, ReceiveReport, SendConfig,
    SendReport, SwitchoverReason, TimeoutPolicy, TrackerError, TrackerKind, Vcpus, VmError,
};

fn section(name: &str, version: u32, bytes: &[u8]) -> DeviceSection {
    DeviceSection::new(name, version, bytes.to_vec()).unwrap()
}

fn moving_source() -> SoftVm {
    soft(
        layout(4, 2),
        2,
        TrackerKind::ClearLog,
        workload(256, Some(2000), true),
    )
}

/// Migrate `src` over `n` Unix socket pairs into a software target that knows `known`.
fn over_unix_pairs(
    src: &SoftVm,
    n: usize,
    known: Vec<DeviceSection>,
) -> (
    Result<SendReport, MigrateError>,
    Result<(SoftVm, ReceiveReport), MigrateError>,
) {
    let (mine, theirs): (Vec<UnixStream>, Vec<UnixStream>) =
        (0..n).map(|_| UnixStream::pair().unwrap()).unzip();
    let config = SendConfig {
        downtime_limit: Duration::from_millis(5),
        max_bandwidth: Some(64 << 20),
        ..send_config(n)
    };
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let mut theirs = theirs.into_iter();
            let first = theirs.next().unwrap();
            receive_on(first, theirs.collect(), &recv_config(), |h| {
                let vm = SoftVm::target(h, TrackerKind::DirtyLog)?;
                vm.keep_resume_image();
                for d in known {
                    vm.add_device(d);
                }
                Ok(vm)
            })
        });
        let sent = send_on(src, mine, &config, &mut |_| {});
        (sent, receiver.join().unwrap())
    })
}

#[test]
fn two_device_sections_travel_over_two_unix_connections() {
    let src = moving_source();
    src.add_device(section("serial0", 1, b"\x60\x03 lcr"));
    src.add_device(section("virtio-blk:0", 7, &[0xab; 5000]));
    let known = vec![section("serial0", 1, b""), section("virtio-blk:0", 7, b"")];
    let (sent, received) = over_unix_pairs(&src, 2, known);
    let report = sent.unwrap();
    let (dst, rrep) = received.unwrap();
    assert_eq!(report.connections, 2);
    assert_eq!((report.devices, rrep.devices), (2, 2));
    assert!(report.rounds.len() >= 2, "{report:?}");
    assert_eq!(rrep.transferred, report.stats.transferred);
    assert!(src.is_paused());
    assert_same_memory(&src, &dst);
    assert_eq!(dst.restored_devices(), ["serial0", "virtio-blk:0"]);
    assert_eq!(dst.device_sections(), src.device_sections());
    assert_runs("target", || target_progress(&dst));
}

#[test]
fn unknown_device_fails_the_migration_and_the_source_resumes() {
    for (known, why) in [
        (vec![section("serial0", 1, b"")], "no device named \"rtc\""),
        (
            vec![section("serial0", 1, b""), section("rtc", 2, b"")],
            "reads state version 2, not 1",
        ),
    ] {
        let src = moving_source();
        src.add_device(section("serial0", 1, b"uart"));
        src.add_device(section("rtc", 1, b"cmos"));
        let (sent, received) = over_unix_pairs(&src, 2, known);
        let err = sent.expect_err("the source must fail");
        let msg = err.to_string();
        assert!(matches!(err, MigrateError::Remote { code: 4, .. }), "{msg}");
        assert!(msg.contains("device \"rtc\" (state version 1)"), "{msg}");
        assert!(msg.contains(why), "{msg}");
        let rerr = received.expect_err("the receiver must fail");
        assert!(
            matches!(&rerr, MigrateError::Device { name, version: 1, .. } if name == "rtc"),
            "{rerr}"
        );
        assert!(!src.is_paused(), "source left paused");
        assert_runs("source after a refused device", || source_progress(&src));
    }
}

#[test]
fn listen_and_send_on_a_unix_socket_path() {
    let dir = std::env::temp_dir().join(format!("dirtylog-compose-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr: Address = format!("unix:{}", dir.join("m.sock").display())
        .parse()
        .unwrap();
    let listener = transport::listen(&addr).unwrap();
    let src = moving_source();
    let (sent, received) = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            receive(&listener, &recv_config(), |h| {
                let vm = SoftVm::target(h, TrackerKind::DirtyLog)?;
                vm.keep_resume_image();
                Ok(vm)
            })
        });
        let config = SendConfig {
            downtime_limit: Duration::from_millis(5),
            ..send_config(3)
        };
        (
            send(&src, addr.clone(), &config, &mut |_| {}),
            receiver.join().unwrap(),
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    let report = sent.unwrap();
    let (dst, rrep) = received.unwrap();
    assert_eq!((report.connections, rrep.connections), (3, 3));
    assert_same_memory(&src, &dst);
}

/// The software VM's memory and tracker, with vCPUs that cannot be throttled: the default
/// [`Vcpus::throttle`].
struct NoThrottle(SoftVm);

impl Vcpus for NoThrottle {
    fn vcpu_count(&self) -> u32 {
        self.0.vcpu_count()
    }
    fn pause(&self) -> Result<(), VmError> {
        Vcpus::pause(&self.0)
    }
    fn resume(&self) -> Result<(), VmError> {
        Vcpus::resume(&self.0)
    }
    fn save_state(&self) -> Result<Vec<Vec<u8>>, VmError> {
        self.0.save_state()
    }
}

impl MigrationSource for NoThrottle {
    type Memory = SoftVm;
    type Tracker = SoftVm;
    type Vcpus = Self;
    fn memory(&self) -> &SoftVm {
        &self.0
    }
    fn tracker(&self) -> &SoftVm {
        &self.0
    }
    fn vcpus(&self) -> &Self {
        self
    }
    fn devices(&self) -> Option<&dyn DeviceState> {
        None
    }
}

#[test]
fn auto_converge_without_throttling_goes_on_and_says_so() {
    // Out-dirties the capped bandwidth, as tests/migrate.rs's heavy guest.
    let src = NoThrottle(soft(
        layout(6, 2),
        1,
        TrackerKind::DirtyLog,
        workload(1024, Some(40_000), true),
    ));
    let config = SendConfig {
        downtime_limit: Duration::from_millis(20),
        max_bandwidth: Some(16 << 20),
        max_rounds: 4,
        on_timeout: TimeoutPolicy::Switchover,
        auto_converge: Some(AutoConverge {
            trigger_rounds: 1,
            ..AutoConverge::default()
        }),
        ..send_config(2)
    };
    let (addr, receiver, _) = spawn_receiver(recv_config());
    let report = send(&src, addr, &config, &mut |_| {}).unwrap();
    let (dst, _) = receiver.join().unwrap().unwrap();
    assert!(report.throttle_unsupported, "{report:?}");
    assert_eq!(report.cpu_throttle_percentage, 0);
    assert_eq!(src.0.throttle_percent(), 0);
    assert_eq!(report.switchover, SwitchoverReason::RoundLimit);
    assert_same_memory(&src.0, &dst);
}

/// The software VM, whose tracker does not start until the test says so.
struct GatedStart {
    vm: SoftVm,
    open: AtomicBool,
}

impl DirtyTracker for GatedStart {
    fn kind(&self) -> TrackerKind {
        self.vm.kind()
    }
    fn start(&self) -> Result<(), TrackerError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.open.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.vm.start()
    }
    fn harvest(&self, index: usize, out: &mut [u64]) -> Result<(), TrackerError> {
        self.vm.harvest(index, out)
    }
    fn clear(&self, index: usize, first_page: u64, bits: &[u64]) -> Result<(), TrackerError> {
        DirtyTracker::clear(&self.vm, index, first_page, bits)
    }
    fn stop(&self) -> Result<(), TrackerError> {
        DirtyTracker::stop(&self.vm)
    }
}

impl MigrationSource for GatedStart {
    type Memory = SoftVm;
    type Tracker = Self;
    type Vcpus = SoftVm;
    fn memory(&self) -> &SoftVm {
        &self.vm
    }
    fn tracker(&self) -> &Self {
        self
    }
    fn vcpus(&self) -> &SoftVm {
        &self.vm
    }
}

#[test]
fn every_hello_is_on_the_wire_before_any_page() {
    // The receiver reads every connection's Hello before any page: a Hello held back in a
    // send buffer until pages fill it would stall the migration.
    let src = GatedStart {
        vm: moving_source(),
        open: AtomicBool::new(false),
    };
    let (mine, theirs): (Vec<UnixStream>, Vec<UnixStream>) =
        (0..2).map(|_| UnixStream::pair().unwrap()).unzip();
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_on(&src, mine, &send_config(2), &mut |_| {}));
        let conn = &theirs[1];
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut dec = Decoder::new(BufReader::new(conn.try_clone().unwrap())).unwrap();
        let mut no_memory = ();
        let hello = dec.next(&mut no_memory).unwrap();
        assert!(
            matches!(
                hello,
                Some(Message::Hello {
                    connection: 1,
                    connections: 2,
                    ..
                })
            ),
            "{hello:?}"
        );
        drop(theirs);
        src.open.store(true, Ordering::SeqCst);
        let err = sender.join().unwrap().expect_err("nobody receives");
        assert!(err.to_string().starts_with("connection "), "{err}");
    });
    assert!(!src.vm.is_paused());
}

/// Guest memory whose VMM bitmaps count pages of another size than the migration's.
struct MismatchedPages {
    memory: dirtylog_migrate::SlotTable<vm_memory::GuestMemoryMmap<dirtylog_migrate::VmmBitmap>>,
    vm: SoftVm,
}

impl MigrationSource for MismatchedPages {
    type Memory =
        dirtylog_migrate::SlotTable<vm_memory::GuestMemoryMmap<dirtylog_migrate::VmmBitmap>>;
    type Tracker = SoftVm;
    type Vcpus = SoftVm;
    fn memory(&self) -> &Self::Memory {
        &self.memory
    }
    fn tracker(&self) -> &SoftVm {
        &self.vm
    }
    fn vcpus(&self) -> &SoftVm {
        &self.vm
    }
}

#[test]
fn a_vmm_bitmap_of_another_page_size_is_refused() {
    // vm-memory's bitmaps count host (4 KiB) pages; announcing 8 KiB pages would read them at
    // the wrong granularity and miss VMM writes.
    let mem = vm_memory::GuestMemoryMmap::<dirtylog_migrate::VmmBitmap>::from_ranges(&[(
        vm_memory::GuestAddress(0),
        1 << 20,
    )])
    .unwrap();
    let src = MismatchedPages {
        memory: dirtylog_migrate::SlotTable::with_page_size(mem, vec![0], 8192).unwrap(),
        vm: moving_source(),
    };
    let (mine, _theirs) = UnixStream::pair().unwrap();
    let err = send_on(&src, vec![mine], &send_config(1), &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, MigrateError::Config(m) if m.contains("VMM bitmap has 256 pages")),
        "{err}"
    );
}
