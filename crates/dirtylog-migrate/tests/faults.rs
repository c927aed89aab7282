//! Fault injection: every failure ends with the source guest running again and the receiver
//! returning an error without ever resuming its guest.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use dirtylog_migrate::soft::SoftVm;
use dirtylog_migrate::soft::{Watch, Workload};
use dirtylog_migrate::wire::{Decoder, Encoder, Message, Region, StreamHeader};
use dirtylog_migrate::TrackerKind;
use dirtylog_migrate::{
    send, MigrateError, Phase, Progress, ReceiveConfig, SendConfig, SendReport, TimeoutPolicy,
    Verify,
};

fn source() -> SoftVm {
    soft(
        layout(4, 2),
        2,
        TrackerKind::ClearLog,
        workload(256, Some(2000), true),
    )
}

/// Every verify mode, for the fault tests that must hold in each.
const MODES: [Verify; 3] = [Verify::Strict, Verify::Background, Verify::Off];

/// Migrate through a proxy applying `fault`, in every verify mode, each with a fresh
/// [`source`]; `arm` sets the proxy's flag from the progress callback. Returns the source's
/// error and the receiver's of each mode, with the source.
fn faulty_in_every_mode(
    connections: usize,
    fault: Fault,
    arm: impl Fn(&Progress) -> bool,
) -> Vec<(Verify, SoftVm, MigrateError, MigrateError)> {
    MODES
        .into_iter()
        .map(|verify| {
            let src = source();
            let (err, rerr) = faulty_with(&src, connections, fault, &arm, verify);
            eprintln!("{verify}: source: {err}\n{verify}: receiver: {rerr}");
            (verify, src, err, rerr)
        })
        .collect()
}

/// Migrate through a proxy applying `fault`; `arm` sets the proxy's flag from the progress
/// callback. Returns the source's error and the receiver's.
fn faulty(
    src: &SoftVm,
    connections: usize,
    fault: Fault,
    arm: impl Fn(&Progress) -> bool,
) -> (MigrateError, MigrateError) {
    faulty_with(src, connections, fault, &arm, Verify::default())
}

fn faulty_with(
    src: &SoftVm,
    connections: usize,
    fault: Fault,
    arm: &dyn Fn(&Progress) -> bool,
    verify: Verify,
) -> (MigrateError, MigrateError) {
    let (addr, receiver, resumed) = spawn_receiver(recv_config());
    let proxy = proxy(addr, fault);
    let config = SendConfig {
        // Strict: room for the digest of the paused memory, slow in a debug build, which the
        // estimate counts (a 5 ms limit would be refused as unreachable before any fault).
        downtime_limit: Duration::from_millis(if verify == Verify::Strict { 1000 } else { 5 }),
        max_bandwidth: Some(32 << 20),
        // Whatever the estimate says on a loaded machine, switch over within a few rounds:
        // the faults, not the limit, must end these migrations.
        on_timeout: TimeoutPolicy::Switchover,
        max_rounds: 5,
        io_timeout: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(5),
        verify,
        ..send_config(connections)
    };
    let flag = proxy.flag.clone();
    let sent = send(src, proxy.addr, &config, &mut |p| {
        if arm(p) {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let err = sent.expect_err("the migration must fail");
    let rerr = receiver
        .join()
        .unwrap()
        .expect_err("the receiver must fail");
    assert!(
        !resumed.load(Ordering::SeqCst),
        "the receiver left a guest running ({verify})"
    );
    assert_source_recovered(src);
    (err, rerr)
}

fn assert_source_recovered(src: &SoftVm) {
    assert!(!src.is_paused(), "source guest left paused");
    assert_eq!(src.throttle_percent(), 0);
    assert_runs("source after failure", || source_progress(src));
}

#[test]
fn connection_cut_during_bulk_pass() {
    for (_, _, err, rerr) in faulty_in_every_mode(1, Fault::CutAfter(300_000), |_| false) {
        assert!(err.to_string().starts_with("connection 0:"), "{err}");
        assert!(rerr.to_string().starts_with("connection 0:"), "{rerr}");
    }
}

#[test]
fn connection_cut_during_a_round_three_connections() {
    faulty_in_every_mode(3, Fault::CutAfterFlag(20_000), |p| {
        p.phase == Phase::Iterating
    });
}

#[test]
fn connection_cut_during_switchover() {
    let runs = faulty_in_every_mode(2, Fault::CutAfterFlag(0), |p| p.phase == Phase::Switchover);
    for (verify, src, ..) in runs {
        // The source paused its guest for the setup probe (more than one on a loaded
        // machine) and for the final round; it runs again after each.
        assert!(src.resume_count() >= 2, "{verify}: {}", src.resume_count());
    }
}

#[test]
fn flipped_byte_fails_the_crc_or_the_memory_check() {
    // The flipped byte lands in one of the first pages of slot 0: a guest that writes only
    // far from them, so that no later round sends a good copy over the bad one (which would
    // be a migration that rightly succeeds).
    let source = || {
        let w = Workload {
            first_page: 900,
            ..workload(256, Some(2000), true)
        };
        soft(layout(4, 2), 2, TrackerKind::ClearLog, w)
    };
    // Unverified: every byte of every frame is under a CRC.
    let src = source();
    let (err, rerr) = faulty_with(&src, 1, Fault::FlipAt(200_000), &|_| false, Verify::Off);
    eprintln!("off: source: {err}\nreceiver: {rerr}");
    assert!(rerr.to_string().contains("CRC mismatch"), "{rerr}");
    // The receiver's explanation reaches the source.
    assert!(
        matches!(&err, MigrateError::Remote { message, .. } if message.contains("CRC mismatch")),
        "{err}"
    );
    // Verified: the byte lies in a page, which its hash checks instead of a second CRC; the
    // destination never keeps the guest (strict: it never runs it).
    for verify in [Verify::Strict, Verify::Background] {
        let src = source();
        let (err, rerr) = faulty_with(&src, 1, Fault::FlipAt(200_000), &|_| false, verify);
        eprintln!("{verify}: source: {err}\nreceiver: {rerr}");
        assert!(
            matches!(rerr, MigrateError::HashMismatch { slot: 0, .. }),
            "{verify}: {rerr}"
        );
        assert!(
            matches!(&err, MigrateError::Remote { message, .. }
                if message.contains("memory hash mismatch in slot 0")),
            "{verify}: {err}"
        );
        assert_source_recovered(&src);
    }
}

#[test]
fn truncated_stream() {
    let src = source();
    let (err, rerr) = faulty(&src, 1, Fault::TruncateAt(150_000), |_| false);
    eprintln!("source: {err}\nreceiver: {rerr}");
    assert!(rerr.to_string().contains("stream truncated"), "{rerr}");
    assert!(
        matches!(&err, MigrateError::Remote { message, .. } if message.contains("truncated")),
        "{err}"
    );
}

#[test]
fn wrong_version_is_refused() {
    let src = source();
    let (err, rerr) = faulty(&src, 1, Fault::Patch(8, &[9, 0, 0, 0]), |_| false);
    eprintln!("source: {err}\nreceiver: {rerr}");
    assert!(
        rerr.to_string().contains("unsupported stream version 9"),
        "{rerr}"
    );
    assert!(
        err.to_string().contains("unsupported stream version 9"),
        "{err}"
    );
}

#[test]
fn receiver_dropped_mid_stream() {
    let src = source();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 100_000];
        s.read_exact(&mut buf).unwrap();
        // Gone: close with unread data (a reset).
    });
    let err = send(&src, addr, &send_config(1), &mut |_| {}).unwrap_err();
    fake.join().unwrap();
    eprintln!("source: {err}");
    assert!(err.to_string().starts_with("connection 0:"), "{err}");
    assert_source_recovered(&src);
}

/// In every verify mode but off, a write the tracker missed is caught before the source lets
/// go of its guest, and the source runs on; in background mode the destination had resumed
/// and is stopped again.
#[test]
fn untracked_write_is_caught_by_the_hash() {
    for verify in [Verify::Strict, Verify::Background] {
        let (src, sent, received, watch) = untracked_write(verify);
        let err = sent.unwrap_err();
        eprintln!("{verify}: source: {err}");
        assert!(
            matches!(&err, MigrateError::Remote { code: 3, message, .. }
                if message.contains("memory hash mismatch in slot 0")),
            "{verify}: {err}"
        );
        let rerr = received.unwrap_err();
        assert!(
            matches!(rerr, MigrateError::HashMismatch { slot: 0, .. }),
            "{verify}: {rerr}"
        );
        let watch = watch.expect("a target was built");
        let resumes = usize::from(verify == Verify::Background);
        assert_eq!(watch.resume_count(), resumes, "{verify}: {watch:?}");
        assert!(watch.stopped(), "{verify}: the destination guest runs on");
        assert_source_recovered(&src);
    }
    // Off: nothing checks. The write really is lost on the way (so the two above can only
    // pass by catching it).
    let (src, sent, received, watch) = untracked_write(Verify::Off);
    sent.expect("verify off: nothing fails");
    let (dst, _) = received.expect("verify off: the receiver succeeds");
    assert!(watch.expect("a target was built").running());
    let image = dst.resume_image().expect("the target kept its image");
    let at = 1000 * PAGE as usize;
    assert_ne!(
        image[0][at..at + 8],
        src.snapshot(0)[at..at + 8],
        "the untracked write reached the destination anyway"
    );
}

/// Migrate a busy guest while writing page 1000 behind the tracker's back.
fn untracked_write(
    verify: Verify,
) -> (
    SoftVm,
    Result<SendReport, MigrateError>,
    Received,
    Option<Watch>,
) {
    // A dirtier fast enough that every round finds dirty pages: at 2000 pages/s it writes in
    // batches of 64 every 32 ms, and a round that found none "converged" at once (0 expected
    // downtime) before any pre-copy round ran (seen on a loaded machine).
    let src = soft(
        layout(4, 2),
        2,
        TrackerKind::ClearLog,
        workload(256, Some(50_000), true),
    );
    let (addr, receiver, _, watch) = spawn_watched_receiver(recv_config());
    // A zero downtime budget never converges, so at least one round runs before the round
    // limit forces the switchover: the write below lands after that round's harvest, outside
    // the dirtier's working set, so no later round sends it.
    let config = SendConfig {
        downtime_limit: Duration::ZERO,
        max_rounds: 2,
        on_timeout: TimeoutPolicy::Switchover,
        verify,
        ..send_config(1)
    };
    let mut done = false;
    let sent = send(&src, addr, &config, &mut |p| {
        if p.phase == Phase::Iterating && !done {
            done = true;
            src.write_untracked(1000, 0xbad);
        }
    });
    assert!(done, "no pre-copy round ran");
    let received = receiver.join().unwrap();
    let watch = watch.lock().unwrap().clone();
    (src, sent, received, watch)
}

// Hand-made streams against the receiver alone.

fn raw_header() -> StreamHeader {
    StreamHeader::new(
        4096,
        1,
        vec![Region {
            slot: 2,
            gpa: 0,
            size: 64 * 4096,
        }],
    )
    .unwrap()
}

fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![ty, 0];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// Send a valid preamble, header and Hello, then `tail`; return the receiver's error and the
/// reply frame it sent back.
fn hostile(tail: &[u8]) -> (MigrateError, String) {
    let (addr, receiver, resumed) = spawn_receiver(recv_config());
    let mut s = TcpStream::connect(addr).unwrap();
    let mut enc = Encoder::new(&mut s, raw_header()).unwrap();
    enc.send(Message::Hello {
        connection: 0,
        connections: 1,
        session: 1,
    })
    .unwrap();
    s.write_all(tail).unwrap();
    let err = receiver
        .join()
        .unwrap()
        .expect_err("the receiver must fail");
    assert!(!resumed.load(Ordering::SeqCst));
    let mut replies = Decoder::back_channel(&s, raw_header());
    let reply = match replies.next(&mut ()) {
        Ok(Some(Message::Error { code, message })) => format!("{code}: {message}"),
        other => format!("{other:?}"),
    };
    (err, reply)
}

#[test]
fn range_past_the_end_is_refused() {
    let mut p = Vec::new();
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&60u64.to_le_bytes());
    p.extend_from_slice(&8u64.to_le_bytes());
    p.extend_from_slice(&vec![0xaa; 8 * 4096]);
    let (err, reply) = hostile(&raw_frame(2, &p));
    assert_eq!(
        err.to_string(),
        "connection 0: range slot 2 pages 60..68 is past the end of the region (64 pages)"
    );
    assert_eq!(
        reply,
        "2: connection 0: range slot 2 pages 60..68 is past the end of the region (64 pages)"
    );
}

#[test]
fn absurd_length_is_refused_before_allocating() {
    let mut head = vec![5u8, 0];
    head.extend_from_slice(&u32::MAX.to_le_bytes());
    let (err, reply) = hostile(&head);
    assert!(
        err.to_string()
            .contains("VcpuState frame payload of 4294967295 bytes"),
        "{err}"
    );
    assert!(reply.starts_with("2: "), "{reply}");
}

#[test]
fn page_sent_twice_in_one_round_is_refused() {
    let zero = |first: u64, n: u64| {
        let mut p = Vec::new();
        p.extend_from_slice(&2u32.to_le_bytes());
        p.extend_from_slice(&first.to_le_bytes());
        p.extend_from_slice(&n.to_le_bytes());
        raw_frame(3, &p)
    };
    let mut tail = zero(0, 10);
    tail.extend(zero(5, 1));
    let (err, _) = hostile(&tail);
    assert!(
        err.to_string().contains("overlaps pages already received"),
        "{err}"
    );
}

#[test]
fn done_without_hashes_is_refused() {
    let mut tail = Vec::new();
    let mut p = Vec::new();
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&64u64.to_le_bytes());
    tail.extend(raw_frame(3, &p));
    let mut r = 0u64.to_le_bytes().to_vec();
    r.extend_from_slice(&64u64.to_le_bytes());
    tail.extend(raw_frame(4, &r));
    tail.extend(raw_frame(7, &[]));
    let (err, _) = hostile(&tail);
    assert!(
        err.to_string().contains("without the state of vCPU 0"),
        "{err}"
    );
}

#[test]
fn hostile_hello_is_refused() {
    let (addr, receiver, resumed) = spawn_receiver(recv_config());
    let mut s = TcpStream::connect(addr).unwrap();
    Encoder::new(&mut s, raw_header()).unwrap();
    // Valid framing, but an impossible count.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&1000u32.to_le_bytes());
    p.extend_from_slice(&1u64.to_le_bytes());
    s.write_all(&raw_frame(11, &p)).unwrap();
    let err = receiver.join().unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("Hello frame for connection 0 of 1000"),
        "{err}"
    );
    assert!(!resumed.load(Ordering::SeqCst));
}

/// A connection opened first that never says anything is dropped after the handshake
/// timeout, and the real sender, which connects after it, migrates (before, the receiver read
/// the idle connection until its I/O timeout and failed the migration).
#[test]
fn an_idle_first_connection_does_not_hold_up_the_sender() {
    let src = source();
    let (addr, receiver, _) = spawn_receiver(ReceiveConfig {
        handshake_timeout: Duration::from_millis(300),
        ..recv_config()
    });
    let idle = TcpStream::connect(addr).unwrap();
    let config = SendConfig {
        downtime_limit: Duration::from_secs(1),
        ..send_config(1)
    };
    let sent = send(&src, addr, &config, &mut |_| {});
    let report = sent.expect("the real sender migrates");
    assert!(src.is_paused());
    let (dst, rrep) = receiver
        .join()
        .unwrap()
        .expect("the receiver takes the real sender");
    assert_eq!(rrep.transferred, report.stats.transferred);
    assert_same_memory(&src, &dst);
    drop(idle);
}

/// A sender that goes silent after its Hello: the receiver's read times out and says so —
/// "timed out", with the connection — never a bare "Resource temporarily unavailable (os
/// error 11)", and no guest runs.
#[test]
fn a_silent_sender_is_reported_as_a_timeout() {
    let (addr, receiver, running) = spawn_receiver(ReceiveConfig {
        io_timeout: Duration::from_millis(300),
        ..recv_config()
    });
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
    let mut enc = Encoder::new(TcpStream::connect(addr).unwrap(), header).unwrap();
    enc.send(Message::Hello {
        connection: 0,
        connections: 1,
        session: 3,
    })
    .unwrap();
    enc.flush().unwrap();
    let e = match receiver.join().unwrap() {
        Ok(_) => panic!("a silent sender's migration completed"),
        Err(e) => e.to_string(),
    };
    assert!(e.starts_with("connection 0: "), "{e}");
    assert!(e.contains("timed out"), "{e}");
    assert!(!e.contains("os error"), "{e}");
    assert!(!running.load(Ordering::SeqCst));
    drop(enc);
}

/// The largest timeouts a caller can give (the CLI's `--accept-timeout-s 18446744073709551615`
/// once reached the engine as such) neither panic adding to the clock nor wrap to zero: a
/// two-connection migration goes through.
#[test]
fn huge_receive_timeouts_neither_panic_nor_wrap() {
    let src = source();
    let (addr, receiver, _) = spawn_receiver(ReceiveConfig {
        accept_timeout: Some(Duration::MAX),
        connections_timeout: Duration::MAX,
        handshake_timeout: Duration::MAX,
        ..recv_config()
    });
    let sent = send(&src, addr, &send_config(2), &mut |_| {});
    let (dst, _) = receiver.join().unwrap().expect("the receiver");
    sent.expect("the sender");
    assert_same_memory(&src, &dst);
}

/// A VM whose region 0 is a private mapping of a file with data on page 7 — memory for which
/// "unpopulated means zero" is false — and which claims it anyway. Tracker, vCPUs and region 1
/// are an idle software VM's.
struct FileBacked {
    vm: SoftVm,
    map: *mut u8,
    len: usize,
}

// SAFETY: the mapping is read only by the engine (through `RegionMemory`) while it lives.
unsafe impl Sync for FileBacked {}

impl FileBacked {
    fn new() -> Self {
        let vm = soft(layout(4, 2), 1, TrackerKind::ClearLog, Workload::idle());
        let len = 4 << 20;
        let mut file = tempfile_with(len, 7 * PAGE as usize, &[0xab; 64]);
        file.flush().unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private mapping of our own file; nothing else maps it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        FileBacked {
            vm,
            map: map.cast(),
            len,
        }
    }
}

impl Drop for FileBacked {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, with this length; no migration borrows it any more.
        unsafe { libc::munmap(self.map.cast(), self.len) };
    }
}

/// A file of `len` bytes, zero but for `bytes` at `at`, unlinked.
fn tempfile_with(len: usize, at: usize, bytes: &[u8]) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("dirtylog-filebacked-{}", std::process::id()));
    let mut file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(len as u64).unwrap();
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(at as u64)).unwrap();
    file.write_all(bytes).unwrap();
    file
}

impl dirtylog_migrate::MigrationMemory for FileBacked {
    fn page_size(&self) -> u32 {
        self.vm.page_size()
    }
    fn regions(&self) -> Vec<Region> {
        self.vm.regions()
    }
    fn region_memory(&self, index: usize) -> Option<dirtylog_migrate::RegionMemory> {
        if index == 0 {
            // SAFETY: a private mapping of `len` bytes that lives as long as `self`, which
            // outlives the migration; nothing writes it.
            Some(unsafe { dirtylog_migrate::RegionMemory::new(self.map, self.len) })
        } else {
            self.vm.region_memory(index)
        }
    }
    /// The wrong answer for region 0: its file's pages hold data before they are mapped.
    fn unpopulated_is_zero(&self, _index: usize) -> bool {
        true
    }
}

impl dirtylog_migrate::MigrationSource for FileBacked {
    type Memory = Self;
    type Tracker = SoftVm;
    type Vcpus = SoftVm;
    fn memory(&self) -> &Self {
        self
    }
    fn tracker(&self) -> &SoftVm {
        &self.vm
    }
    fn vcpus(&self) -> &SoftVm {
        &self.vm
    }
}

#[test]
fn a_wrong_unpopulated_claim_is_caught_by_the_hash() {
    use dirtylog_migrate::MigrationMemory;
    // Off first: the claim really makes the bulk pass skip page 7 (so the other modes can
    // only pass by catching it).
    let src = FileBacked::new();
    let (addr, receiver, _, _) = spawn_watched_receiver(recv_config());
    let config = SendConfig {
        verify: Verify::Off,
        ..send_config(1)
    };
    let report = send(&src, addr, &config, &mut |_| {}).expect("verify off: nothing fails");
    let (dst, _) = receiver
        .join()
        .unwrap()
        .expect("verify off: the receiver succeeds");
    assert!(report.rounds[0].stats.unpopulated_pages > 0, "{report:?}");
    let at = 7 * PAGE as usize;
    assert_eq!(dst.snapshot(0)[at], 0, "page 7 was skipped as unpopulated");
    // SAFETY: `src` is not migrating any more; the mapping is valid and nobody writes it.
    let source_byte = unsafe { *src.region_memory(0).unwrap().as_ptr().add(at) };
    assert_eq!(source_byte, 0xab);
    drop(dst);

    for verify in [Verify::Strict, Verify::Background] {
        let src = FileBacked::new();
        let (addr, receiver, _, watch) = spawn_watched_receiver(recv_config());
        let config = SendConfig {
            verify,
            ..send_config(1)
        };
        let err = send(&src, addr, &config, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, MigrateError::Remote { code: 3, message, .. }
                if message.contains("memory hash mismatch in slot 0")),
            "{verify}: {err}"
        );
        let rerr = receiver.join().unwrap().unwrap_err();
        assert!(
            matches!(rerr, MigrateError::HashMismatch { slot: 0, .. }),
            "{verify}: {rerr}"
        );
        let watch = watch.lock().unwrap().clone().expect("a target was built");
        assert!(watch.stopped(), "{verify}: the destination guest runs on");
        assert!(!src.vm.is_paused(), "{verify}: source guest left paused");
    }
}

/// Pages sent without a CRC (checked by their hashes) and then a `Prepare` that asks for no
/// memory check: nothing would ever have checked them, so the receiver refuses the guest.
#[test]
fn pages_without_a_crc_in_an_unverified_stream_are_refused() {
    use dirtylog_migrate::wire::{PageRange, VERIFY_NONE};
    use dirtylog_migrate::Vcpus;
    let vm = soft(layout(4, 2), 1, TrackerKind::ClearLog, Workload::idle());
    vm.pause().unwrap();
    let blobs = vm.save_state().unwrap();

    let mut tail = Vec::new();
    let mut enc = Encoder::back_channel(&mut tail, raw_header());
    enc.set_hash_checked_pages(true);
    let page = vec![0x5a; 4096];
    let range = PageRange {
        slot: 2,
        first_page: 3,
        npages: 1,
    };
    enc.send(Message::Pages { range, data: &page }).unwrap();
    enc.send(Message::RoundEnd {
        round: 0,
        dirty_pages: 64,
    })
    .unwrap();
    enc.send(Message::VcpuState {
        vcpu_id: 0,
        blob: &blobs[0],
    })
    .unwrap();
    enc.send(Message::Prepare {
        verify: VERIFY_NONE,
    })
    .unwrap();
    let (err, reply) = hostile(&tail);
    let why = "1 pages came without a CRC (checked by page hashes) in a stream that then asks \
               for no memory check";
    assert!(err.to_string().contains(why), "{err}");
    assert!(reply.contains(why), "{reply}");
}
