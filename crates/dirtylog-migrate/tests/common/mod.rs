//! Shared helpers: software VMs, loopback migrations, and a TCP proxy that injects faults.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirtylog_migrate::soft::{SoftConfig, SoftVm, Watch, Workload};
use dirtylog_migrate::wire::Region;
use dirtylog_migrate::TrackerKind;
use dirtylog_migrate::{
    receive, send, MigrateError, MigrationMemory, MigrationSource, MigrationTarget, ReceiveConfig,
    ReceiveReport, SendConfig, SendReport,
};

pub const PAGE: u64 = 4096;

/// Two regions with a hole between them: `mib0` MiB at 0 and `mib1` MiB at 4 GiB.
pub fn layout(mib0: u64, mib1: u64) -> Vec<Region> {
    vec![
        Region {
            slot: 0,
            gpa: 0,
            size: mib0 << 20,
        },
        Region {
            slot: 3,
            gpa: 4 << 30,
            size: mib1 << 20,
        },
    ]
}

pub fn soft(regions: Vec<Region>, vcpus: u32, tracker: TrackerKind, workload: Workload) -> SoftVm {
    SoftVm::source(&SoftConfig {
        page_size: PAGE as u32,
        regions,
        vcpus,
        tracker,
        workload,
        nonzero_percent: 40,
    })
    .unwrap()
}

pub fn workload(pages: u64, rate: Option<u64>, random: bool) -> Workload {
    Workload {
        first_page: 16,
        pages,
        rate,
        random,
        vmm_rate: None,
    }
}

pub fn recv_config() -> ReceiveConfig {
    ReceiveConfig {
        accept_timeout: Some(Duration::from_secs(20)),
        connections_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        ..ReceiveConfig::default()
    }
}

pub fn send_config(connections: usize) -> SendConfig {
    SendConfig {
        connections,
        io_timeout: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(20),
        ..SendConfig::default()
    }
}

pub type Received = Result<(SoftVm, ReceiveReport), MigrateError>;

/// A receiver thread on a fresh loopback port, building a `SoftVm` target; the flag says
/// whether a target guest runs once `receive` has returned (it must not, on failure: a target
/// resumed before a background check must have been stopped).
pub fn spawn_receiver(
    config: ReceiveConfig,
) -> (SocketAddr, JoinHandle<Received>, Arc<AtomicBool>) {
    let (addr, handle, running, _) = spawn_watched_receiver(config);
    (addr, handle, running)
}

/// A watch on the target a receiver built, set once it is built.
pub type TargetWatch = Arc<Mutex<Option<Watch>>>;

/// [`spawn_receiver`], with a watch on the target it built.
pub fn spawn_watched_receiver(
    config: ReceiveConfig,
) -> (
    SocketAddr,
    JoinHandle<Received>,
    Arc<AtomicBool>,
    TargetWatch,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let running = Arc::new(AtomicBool::new(false));
    let watch = Arc::new(Mutex::new(None));
    let (flag, w) = (running.clone(), watch.clone());
    let handle = std::thread::spawn(move || {
        let r = receive(&listener, &config, |h| {
            let vm = SoftVm::target(h, TrackerKind::DirtyLog)?;
            vm.keep_resume_image();
            *w.lock().unwrap() = Some(vm.watch());
            Ok(vm)
        });
        let guest_runs = match &r {
            Ok((vm, _)) => vm.resume_count() > 0,
            Err(_) => w.lock().unwrap().as_ref().is_some_and(Watch::running),
        };
        flag.store(guest_runs, Ordering::SeqCst);
        r
    });
    (addr, handle, running, watch)
}

/// Migrate `source` to a fresh loopback receiver.
pub fn migrate(
    source: &SoftVm,
    config: &SendConfig,
) -> (Result<SendReport, MigrateError>, Received) {
    let (addr, receiver, _) = spawn_receiver(recv_config());
    let sent = send(source, addr, config, &mut |_| {});
    (sent, receiver.join().unwrap())
}

/// Assert the target resumed with the source's memory (the source is paused after a
/// migration; the target has moved on since its resume).
pub fn assert_same_memory(source: &SoftVm, target: &SoftVm) {
    let image = target
        .resume_image()
        .expect("the target kept its resume image");
    assert_eq!(image.len(), MigrationMemory::regions(source).len());
    for (i, b) in image.iter().enumerate() {
        let a = source.snapshot(i);
        assert_eq!(a.len(), b.len());
        if a != *b {
            let page = a
                .chunks(PAGE as usize)
                .zip(b.chunks(PAGE as usize))
                .position(|(x, y)| x != y)
                .unwrap();
            panic!("region {i} differs first at page {page}");
        }
    }
}

/// The guest's progress keeps advancing.
pub fn assert_runs(name: &str, progress: impl Fn() -> u64) {
    let before = progress();
    let deadline = Instant::now() + Duration::from_secs(5);
    while progress() <= before {
        assert!(
            Instant::now() < deadline,
            "{name}: guest progress stuck at {before}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn target_progress(t: &SoftVm) -> u64 {
    MigrationTarget::guest_progress(t)
}

pub fn source_progress(s: &SoftVm) -> u64 {
    MigrationSource::guest_progress(s)
}

/// What the proxy does to the sender-to-receiver bytes (all connections counted together).
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Pass everything.
    None,
    /// Close both directions of every connection after this many bytes.
    CutAfter(u64),
    /// Close once the flag is set and this many more bytes have passed.
    CutAfterFlag(u64),
    /// Invert the byte at this offset.
    FlipAt(u64),
    /// Stop forwarding at this offset and half-close towards the receiver (it sees EOF).
    TruncateAt(u64),
    /// Overwrite bytes starting at this offset.
    Patch(u64, &'static [u8]),
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub flag: Arc<AtomicBool>,
    pub forwarded: Arc<AtomicU64>,
}

/// A proxy in front of `upstream` applying `fault`.
pub fn proxy(upstream: SocketAddr, fault: Fault) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let forwarded = Arc::new(AtomicU64::new(0));
    let (f, fwd) = (flag.clone(), forwarded.clone());
    std::thread::spawn(move || {
        let cut_all: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let flag_mark = Arc::new(AtomicU64::new(u64::MAX));
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(upstream) else {
                return;
            };
            {
                let mut all = cut_all.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(server.try_clone().unwrap());
            }
            // Receiver to sender: plain.
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                while let Ok(n) = s2.read(&mut buf) {
                    if n == 0 || c2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c2.shutdown(Shutdown::Write);
            });
            let (mut c, mut s) = (client, server);
            let (f, fwd, cut_all, flag_mark) =
                (f.clone(), fwd.clone(), cut_all.clone(), flag_mark.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let start = fwd.fetch_add(n as u64, Ordering::SeqCst);
                    let end = start + n as u64;
                    let chunk = &mut buf[..n];
                    let cut = |all: &Arc<std::sync::Mutex<Vec<TcpStream>>>| {
                        for s in all.lock().unwrap().iter() {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                    };
                    match fault {
                        Fault::None => {}
                        Fault::CutAfter(at) => {
                            if end > at {
                                let keep = at.saturating_sub(start) as usize;
                                let _ = s.write_all(&chunk[..keep]);
                                cut(&cut_all);
                                return;
                            }
                        }
                        Fault::CutAfterFlag(more) => {
                            if f.load(Ordering::SeqCst) {
                                let _ = flag_mark.compare_exchange(
                                    u64::MAX,
                                    start,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                );
                                if end > flag_mark.load(Ordering::SeqCst) + more {
                                    cut(&cut_all);
                                    return;
                                }
                            }
                        }
                        Fault::FlipAt(at) => {
                            if (start..end).contains(&at) {
                                chunk[(at - start) as usize] ^= 0xff;
                            }
                        }
                        Fault::TruncateAt(at) => {
                            if end > at {
                                let keep = at.saturating_sub(start) as usize;
                                let _ = s.write_all(&chunk[..keep]);
                                let _ = s.shutdown(Shutdown::Write);
                                // Swallow the rest so the sender is not blocked.
                                while let Ok(n) = c.read(&mut buf) {
                                    if n == 0 {
                                        break;
                                    }
                                }
                                return;
                            }
                        }
                        Fault::Patch(at, bytes) => {
                            for (k, b) in bytes.iter().enumerate() {
                                let pos = at + k as u64;
                                if (start..end).contains(&pos) {
                                    chunk[(pos - start) as usize] = *b;
                                }
                            }
                        }
                    }
                    if s.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    Proxy {
        addr,
        flag,
        forwarded,
    }
}
