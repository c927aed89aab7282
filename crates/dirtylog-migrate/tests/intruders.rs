//! Connections that are not the sender's, arriving while the receiver accepts a
//! multi-connection migration's connections (recv.rs, `ReceiveConfig::handshake_timeout`):
//! an idle one, one sending garbage, one replaying another session's header and `Hello`, and
//! one forging an error message with control characters are each dropped — logged, escaped —
//! and the real sender's migration completes. Before, the first of them failed the migration
//! (or held it up for the I/O timeout).

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use dirtylog_migrate::soft::SoftVm;
use dirtylog_migrate::transport::Transport;
use dirtylog_migrate::wire::{Decoder, Encoder, Message};
use dirtylog_migrate::{send_on, ReceiveConfig, TrackerKind};

/// A TCP connection that keeps a copy of everything written to it.
struct Recording {
    sock: TcpStream,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Read for Recording {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.read(buf)
    }
}

impl Write for Recording {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sock.write(buf)?;
        self.log.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

impl Transport for Recording {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Recording {
            sock: self.sock.try_clone()?,
            log: self.log.clone(),
        })
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(t)
    }
}

fn source() -> SoftVm {
    soft(
        layout(6, 2),
        2,
        TrackerKind::DirtyLog,
        workload(256, Some(20_000), true),
    )
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// What a real sender sends on the last connection of a 3-connection migration (its own
/// session).
fn record_a_session() -> Vec<u8> {
    let src = source();
    let (addr, receiver, _) = spawn_receiver(recv_config());
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut conns: Vec<Recording> = (0..2)
        .map(|_| Recording {
            sock: connect(addr),
            log: Arc::default(),
        })
        .collect();
    conns.push(Recording {
        sock: connect(addr),
        log: log.clone(),
    });
    send_on(&src, conns, &send_config(3), &mut |_| {}).expect("the recorded migration");
    receiver.join().unwrap().expect("the recorded migration");
    let bytes = log.lock().unwrap().clone();
    bytes
}

#[test]
fn intruders_between_the_accepts_do_not_stop_a_migration() {
    let recorded = record_a_session();
    let header = Decoder::new(&recorded[..]).unwrap().header().clone();

    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = refused.clone();
    let (addr, receiver, running) = spawn_receiver(ReceiveConfig {
        handshake_timeout: Duration::from_millis(300),
        on_refused: Some(Arc::new(move |line: &str| {
            log.lock().unwrap().push(line.to_string())
        })),
        ..recv_config()
    });
    // The listen queue is first come, first accepted: the sender's connection 0, then an
    // idle intruder, connection 1, three more intruders, connection 2.
    let c0 = connect(addr);
    let idle = connect(addr);
    let c1 = connect(addr);
    let mut garbage = connect(addr);
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut replay = connect(addr);
    let prefix = recorded[..recorded.len().min(64 << 10)].to_vec();
    let replayer = std::thread::spawn(move || {
        let _ = replay.write_all(&prefix);
        replay
    });
    let forger = connect(addr);
    let mut enc = Encoder::new(forger.try_clone().unwrap(), header).unwrap();
    enc.send(Message::Error {
        code: 1,
        message: "forged\nmigration completed\x1b[2J",
    })
    .unwrap();
    enc.flush().unwrap();
    let c2 = connect(addr);

    let src = source();
    let sent = send_on(&src, vec![c0, c1, c2], &send_config(3), &mut |_| {});
    let report = sent.expect("the real sender migrates");
    let (dst, rrep) = receiver
        .join()
        .unwrap()
        .expect("the receiver takes the real sender's connections");
    assert!(src.is_paused());
    assert!(running.load(std::sync::atomic::Ordering::SeqCst));
    assert_same_memory(&src, &dst);
    assert_eq!(rrep.connections, 3);
    assert_eq!(rrep.transferred, report.stats.transferred);

    let lines = refused.lock().unwrap().clone();
    eprintln!("refused:\n{}", lines.join("\n"));
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let has = |words: &[&str]| {
        lines
            .iter()
            .any(|l| words.iter().all(|w| l.contains(w)) && l.contains("127.0.0.1:"))
    };
    assert!(has(&["sent nothing within 300ms", "dropped"]), "{lines:#?}");
    assert!(
        has(&["in place of connection 2", "bad magic", "dropped"]),
        "{lines:#?}"
    );
    // The replay differs from the real connection 2 only in its session.
    assert!(
        has(&[
            "in place of connection 2",
            "Hello for connection 2 of 3 (session",
            "does not belong to this migration of 3 connections"
        ]),
        "{lines:#?}"
    );
    assert!(
        has(&["forged\\nmigration completed\\u{1b}[2J"]),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.chars().any(char::is_control)),
        "{lines:#?}"
    );
    drop((idle, garbage, forger, replayer.join().unwrap()));
}

/// Intruders alone: the receiver waits on until the connections deadline, then fails with
/// how many it refused and why the first was, and never runs a guest.
#[test]
fn only_intruders_for_connection_1_fail_with_the_refusals_listed() {
    let recorded = record_a_session();
    let (addr, receiver, running) = spawn_receiver(ReceiveConfig {
        handshake_timeout: Duration::from_millis(200),
        connections_timeout: Duration::from_secs(1),
        ..recv_config()
    });
    // Connection 0 announces 2 connections; the only candidate for connection 1 is idle.
    let mut c0 = connect(addr);
    let header = Decoder::new(&recorded[..]).unwrap().header().clone();
    let mut enc = Encoder::new(c0.try_clone().unwrap(), header).unwrap();
    enc.send(Message::Hello {
        connection: 0,
        connections: 2,
        session: 7,
    })
    .unwrap();
    enc.flush().unwrap();
    let idle = connect(addr);
    let e = match receiver.join().unwrap() {
        Ok(_) => panic!("a migration without its connection 1 completed"),
        Err(e) => e.to_string(),
    };
    eprintln!("receiver: {e}");
    assert!(
        e.starts_with(
            "accepting connection 1 (1 connection refused meanwhile: a connection from 127.0.0.1:"
        ),
        "{e}"
    );
    assert!(e.contains("sent nothing within 200ms"), "{e}");
    assert!(e.contains("no connection arrived in time"), "{e}");
    assert!(!running.load(std::sync::atomic::Ordering::SeqCst));
    // Connection 0 hears why.
    let mut rest = Vec::new();
    let _ = c0.read_to_end(&mut rest);
    assert!(!rest.is_empty(), "no Error frame back on connection 0");
    drop(idle);
}
