//! Migrations over TLS (transport/tls.rs) between two software VMs on loopback: mutual TLS
//! with one and three connections arrives intact; a wrong CA, an expired certificate, a wrong
//! server name, a wrong pre-shared key, a plain peer on either side and a replayed recording
//! of a real session are all refused, with a message saying what to do, before the receiver
//! builds (let alone runs) a guest.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use dirtylog_migrate::soft::SoftVm;
use dirtylog_migrate::transport::tls::{self, TlsConfig, TlsListener};
use dirtylog_migrate::{
    receive, send, send_on, MigrateError, ReceiveConfig, SendReport, TrackerKind,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::PrivateKeyDer;

/// A CA: its certificate and key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// A leaf certificate for `names` signed by `ca`, for a server (receiver) or a client
/// (sender); `expired`: valid only in 2020.
fn leaf(ca: &Ca, names: &[&str], server: bool, expired: bool) -> (rcgen::Certificate, KeyPair) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name.push(
        DnType::CommonName,
        if server { "receiver" } else { "sender" },
    );
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 12, 31);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert, key)
}

fn config(leaf: &(rcgen::Certificate, KeyPair), trust: &Ca) -> TlsConfig {
    TlsConfig::mutual(
        vec![leaf.0.der().clone()],
        PrivateKeyDer::try_from(leaf.1.serialize_der()).unwrap(),
        vec![trust.cert.der().clone()],
    )
    .unwrap()
}

/// A receiver thread on a fresh loopback port, over TLS (`Some`) or plain TCP; the flag is
/// set if it ever built a target (so a refused migration provably ran nothing).
fn spawn(tls: Option<TlsConfig>) -> (SocketAddr, JoinHandle<Received>, Arc<AtomicBool>) {
    spawn_for(tls, Duration::from_secs(20))
}

/// [`spawn`] for a sender that will be refused: a refused connection is dropped and the
/// receiver waits on for the real sender, so it gives up only after `ACCEPT_AFTER_REFUSAL`.
fn spawn_refusing(tls: Option<TlsConfig>) -> (SocketAddr, JoinHandle<Received>, Arc<AtomicBool>) {
    spawn_for(tls, ACCEPT_AFTER_REFUSAL)
}

const ACCEPT_AFTER_REFUSAL: Duration = Duration::from_secs(2);

fn spawn_for(
    tls: Option<TlsConfig>,
    accept_timeout: Duration,
) -> (SocketAddr, JoinHandle<Received>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let built = Arc::new(AtomicBool::new(false));
    let b = built.clone();
    let config = ReceiveConfig {
        accept_timeout: Some(accept_timeout),
        ..recv_config()
    };
    let handle = std::thread::spawn(move || {
        let make = |h: &dirtylog_migrate::wire::StreamHeader| {
            b.store(true, Ordering::SeqCst);
            let vm = SoftVm::target(h, TrackerKind::DirtyLog)?;
            vm.keep_resume_image();
            Ok(vm)
        };
        match tls {
            Some(t) => receive(
                &TlsListener::new(listener, t).with_handshake_timeout(Duration::from_secs(5)),
                &config,
                make,
            ),
            None => receive(&listener, &config, make),
        }
    });
    (addr, handle, built)
}

/// Send `src` to `addr` over `n` connections, over TLS (`Some`) or plain TCP.
fn send_to(
    src: &SoftVm,
    addr: SocketAddr,
    n: usize,
    tls: Option<(&TlsConfig, &str)>,
) -> Result<SendReport, MigrateError> {
    let config = send_config(n);
    match tls {
        None => send(src, addr, &config, &mut |_| {}),
        Some((t, name)) => {
            let streams = tls::connect(
                &addr.into(),
                n,
                Duration::from_secs(5),
                Duration::from_secs(10),
                t,
                name,
            )?;
            send_on(src, streams, &config, &mut |_| {})
        }
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

/// A refused migration: both sides fail with messages containing the given words, the
/// receiver never built a target, and the source guest runs on. A TLS receiver (non-empty
/// `receiver_says`) did not stop at the refusal: it waited on for a real sender until its
/// accept timeout, and then said how many connections it refused and why.
fn assert_refused(
    src: &SoftVm,
    sent: Result<SendReport, MigrateError>,
    received: Received,
    built: &AtomicBool,
    sender_says: &[&str],
    receiver_says: &[&str],
) {
    let s = sent.expect_err("the sender must fail").to_string();
    let r = match received {
        Ok(_) => panic!("the receiver must fail (sender: {s})"),
        Err(e) => e.to_string(),
    };
    eprintln!("sender: {s}\nreceiver: {r}");
    for w in sender_says {
        assert!(s.contains(w), "sender's error lacks {w:?}: {s}");
    }
    for w in receiver_says {
        assert!(r.contains(w), "receiver's error lacks {w:?}: {r}");
    }
    if !receiver_says.is_empty() {
        assert!(
            r.contains("accepting the first connection (1 connection refused meanwhile: "),
            "{r}"
        );
        assert!(r.contains("no connection arrived in time"), "{r}");
    }
    assert!(!built.load(Ordering::SeqCst), "the receiver built a target");
    assert!(!src.is_paused(), "the source guest must run on");
    assert_runs("source", || source_progress(src));
}

fn migrate_mutual(connections: usize) {
    let ca = ca("dirtylog test CA");
    let server = config(&leaf(&ca, &["localhost", "127.0.0.1"], true, false), &ca);
    let client = config(&leaf(&ca, &["sender.example"], false, false), &ca);
    let src = source();
    let (addr, receiver, built) = spawn(Some(server));
    let sent = send_to(&src, addr, connections, Some((&client, "127.0.0.1")));
    let received = receiver.join().unwrap();
    let report = sent.unwrap_or_else(|e| panic!("send failed: {e}"));
    let (dst, rrep) = received.unwrap_or_else(|e| panic!("receive failed: {e}"));
    assert!(built.load(Ordering::SeqCst));
    assert!(src.is_paused());
    assert_same_memory(&src, &dst);
    assert_eq!(dst.resume_count(), 1);
    assert_eq!(report.connections, connections);
    assert_eq!(rrep.connections, connections);
    assert_eq!(rrep.transferred, report.stats.transferred);
    assert_runs("target", || target_progress(&dst));
}

#[test]
fn mutual_tls_one_connection() {
    migrate_mutual(1);
}

#[test]
fn mutual_tls_three_connections() {
    migrate_mutual(3);
}

#[test]
fn mutual_tls_from_pem_files() {
    let dir = std::env::temp_dir().join(format!("dirtylog-tls-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca("pem CA");
    let (cert, key) = leaf(&ca, &["127.0.0.1"], true, false);
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let t = TlsConfig::mutual_from_pem_files(
        &dir.join("cert.pem"),
        &dir.join("key.pem"),
        &dir.join("ca.pem"),
    )
    .unwrap();
    assert_eq!(t.describe(), "mutual TLS");
    // A key file given as the CA: refused, naming the flag and the file.
    let e = TlsConfig::mutual_from_pem_files(
        &dir.join("cert.pem"),
        &dir.join("key.pem"),
        &dir.join("key.pem"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--tls-ca") && e.contains("no CERTIFICATE"),
        "{e}"
    );
    let e = TlsConfig::mutual_from_pem_files(
        &dir.join("cert.pem"),
        &dir.join("missing.pem"),
        &dir.join("ca.pem"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--tls-key") && e.contains("missing.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sender_certificate_from_another_ca_is_refused() {
    let (good, other) = (ca("receiver's CA"), ca("some other CA"));
    let server = config(&leaf(&good, &["127.0.0.1"], true, false), &good);
    // The sender trusts the right CA, but its own certificate comes from another.
    let client = config(&leaf(&other, &["sender"], false, false), &good);
    let src = source();
    let (addr, receiver, built) = spawn_refusing(Some(server));
    let sent = send_to(&src, addr, 1, Some((&client, "127.0.0.1")));
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &["does not trust our certificate", "--tls-ca"],
        &["not signed by a CA in --tls-ca"],
    );
}

#[test]
fn receiver_certificate_from_another_ca_is_refused() {
    let (good, other) = (ca("sender's CA"), ca("impostor CA"));
    let server = config(&leaf(&other, &["127.0.0.1"], true, false), &good);
    let client = config(&leaf(&good, &["sender"], false, false), &good);
    let src = source();
    let (addr, receiver, built) = spawn_refusing(Some(server));
    let sent = send_to(&src, addr, 1, Some((&client, "127.0.0.1")));
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &[
            "receiver's certificate was refused",
            "not signed by a CA in --tls-ca",
        ],
        &["does not trust our certificate"],
    );
}

#[test]
fn expired_sender_certificate_is_refused() {
    let ca = ca("CA");
    let server = config(&leaf(&ca, &["127.0.0.1"], true, false), &ca);
    let client = config(&leaf(&ca, &["sender"], false, true), &ca);
    let src = source();
    let (addr, receiver, built) = spawn_refusing(Some(server));
    let sent = send_to(&src, addr, 1, Some((&client, "127.0.0.1")));
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &["our certificate has expired", "renew"],
        &["outside its validity period", "new certificate"],
    );
}

#[test]
fn expired_receiver_certificate_is_refused() {
    let ca = ca("CA");
    let server = config(&leaf(&ca, &["127.0.0.1"], true, true), &ca);
    let client = config(&leaf(&ca, &["sender"], false, false), &ca);
    let src = source();
    let (addr, receiver, built) = spawn_refusing(Some(server));
    let sent = send_to(&src, addr, 1, Some((&client, "127.0.0.1")));
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &["outside its validity period"],
        &["expired"],
    );
}

#[test]
fn wrong_server_name_is_refused() {
    let ca = ca("CA");
    let server = config(&leaf(&ca, &["receiver.example"], true, false), &ca);
    let client = config(&leaf(&ca, &["sender"], false, false), &ca);
    let src = source();
    let (addr, receiver, built) = spawn_refusing(Some(server));
    let sent = send_to(&src, addr, 1, Some((&client, "127.0.0.1")));
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &["--tls-server-name"],
        &["does not trust our certificate"],
    );
}

#[test]
fn psk_migration_with_three_connections() {
    let t = TlsConfig::psk(&[0x5a; 32]).unwrap();
    let src = source();
    let (addr, receiver, _) = spawn(Some(t.clone()));
    let sent = send_to(&src, addr, 3, Some((&t, "ignored in psk mode")));
    let received = receiver.join().unwrap();
    sent.unwrap_or_else(|e| panic!("send failed: {e}"));
    let (dst, _) = received.unwrap_or_else(|e| panic!("receive failed: {e}"));
    assert_same_memory(&src, &dst);
}

#[test]
fn wrong_psk_is_refused() {
    let src = source();
    let (addr, receiver, built) = spawn_refusing(Some(TlsConfig::psk(&[1; 32]).unwrap()));
    let other = TlsConfig::psk(&[2; 32]).unwrap();
    let sent = send_to(&src, addr, 1, Some((&other, "x")));
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &["refused our pre-shared-key proof", "same --psk-file"],
        &["pre-shared-key proof is wrong", "same --psk-file"],
    );
}

#[test]
fn short_psk_file_is_refused() {
    let path = std::env::temp_dir().join(format!("dirtylog-short-psk-{}", std::process::id()));
    std::fs::write(&path, b"hunter2").unwrap();
    let e = TlsConfig::psk_from_file(&path).unwrap_err().to_string();
    let _ = std::fs::remove_file(&path);
    assert!(
        e.contains("7 bytes, fewer than 32") && e.contains("/dev/urandom"),
        "{e}"
    );
}

#[test]
fn plain_sender_against_a_tls_receiver_is_refused() {
    let src = source();
    let (addr, receiver, built) = spawn_refusing(Some(TlsConfig::psk(&[1; 32]).unwrap()));
    let sent = send_to(&src, addr, 1, None);
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &[],
        &["does not speak TLS", "--psk-file"],
    );
}

#[test]
fn tls_sender_against_a_plain_receiver_is_refused() {
    let src = source();
    let (addr, receiver, built) = spawn(None);
    let t = TlsConfig::psk(&[1; 32]).unwrap();
    let sent = send_to(&src, addr, 1, Some((&t, "x")));
    assert_refused(
        &src,
        sent,
        receiver.join().unwrap(),
        &built,
        &["TLS with", "does not speak TLS", "--psk-file"],
        &[],
    );
}

/// A proxy that forwards every connection to `upstream` and records what the sender sent
/// on each.
/// What the sender sent on each connection, in the order they came.
type Records = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

fn recording_proxy(upstream: SocketAddr) -> (SocketAddr, Records) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let records: Records = Arc::default();
    let r = records.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(upstream) else {
                return;
            };
            let record = Arc::new(Mutex::new(Vec::new()));
            r.lock().unwrap().push(record.clone());
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
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, records)
}

#[test]
fn replayed_psk_session_is_refused() {
    let t = TlsConfig::psk(&[9; 32]).unwrap();
    // A real migration through the recording proxy.
    let src = source();
    let (addr, receiver, _) = spawn(Some(t.clone()));
    let (via, records) = recording_proxy(addr);
    send_to(&src, via, 1, Some((&t, "x"))).unwrap();
    receiver.join().unwrap().unwrap();
    let recorded = records.lock().unwrap()[0].lock().unwrap().clone();
    assert!(
        recorded.len() > 1 << 20,
        "recorded {} bytes",
        recorded.len()
    );

    // The sender's bytes replayed, as fast as they go, to a new receiver with the same key.
    let (addr, receiver, built) = spawn_refusing(Some(t));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = s.write_all(&recorded);
            let _ = s.shutdown(Shutdown::Write);
        })
    };
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let _ = writer.join();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !receiver.is_finished() {
        assert!(Instant::now() < deadline, "the receiver is still waiting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = match receiver.join().unwrap() {
        Ok(_) => panic!("a replayed session was accepted"),
        Err(e) => e.to_string(),
    };
    eprintln!("receiver: {e}");
    assert!(e.contains("TLS with"), "{e}");
    assert!(
        e.contains("1 connection refused meanwhile: TLS with"),
        "{e}"
    );
    assert!(!built.load(Ordering::SeqCst), "the receiver built a target");
}

/// Intruders against a mutual-TLS receiver, before its first connection and between the
/// accepts of a 3-connection migration: a certificate from another CA, an expired one, none
/// at all (a pre-shared-key client), a plain TCP client and an idle connection. Each is
/// refused and dropped — its own side told why — and the real sender's migration completes.
#[test]
fn tls_intruders_are_refused_and_the_sender_migrates() {
    let (good, other) = (ca("the CA"), ca("another CA"));
    let server = config(&leaf(&good, &["127.0.0.1"], true, false), &good);
    let client = config(&leaf(&good, &["sender"], false, false), &good);
    let wrong_ca = config(&leaf(&other, &["sender"], false, false), &good);
    let expired = config(&leaf(&good, &["sender"], false, true), &good);
    let no_cert = TlsConfig::psk(&[5; 32]).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = refused.clone();
    let config = ReceiveConfig {
        handshake_timeout: Duration::from_millis(500),
        on_refused: Some(Arc::new(move |l: &str| log.lock().unwrap().push(l.into()))),
        ..recv_config()
    };
    let receiver = std::thread::spawn(move || {
        let l =
            TlsListener::new(listener, server).with_handshake_timeout(Duration::from_millis(500));
        receive(&l, &config, |h| {
            let vm = SoftVm::target(h, TrackerKind::DirtyLog)?;
            vm.keep_resume_image();
            Ok(vm)
        })
    });
    let tcp = || {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    // An intruder's handshake runs in its own thread; its TCP connection is made here, so
    // the listen queue has the order written below.
    let intruder = |t: &TlsConfig| {
        let (s, t) = (tcp(), t.clone());
        std::thread::spawn(move || {
            tls::client(s, &t, "127.0.0.1", Duration::from_secs(10), "receiver")
                .map(drop)
                .map_err(|e| e.to_string())
        })
    };
    let i_wrong_ca = intruder(&wrong_ca);
    let c0 = tls::client(tcp(), &client, "127.0.0.1", Duration::from_secs(10), "r").unwrap();
    let idle = tcp();
    let c1 = tls::client_deferred(tcp(), &client, "127.0.0.1", "r").unwrap();
    let i_no_cert = intruder(&no_cert);
    let mut plain = tcp();
    plain.write_all(b"not TLS at all\r\n").unwrap();
    let i_expired = intruder(&expired);
    let c2 = tls::client_deferred(tcp(), &client, "127.0.0.1", "r").unwrap();

    let src = source();
    let sent = send_on(&src, vec![c0, c1, c2], &send_config(3), &mut |_| {});
    let report = sent.expect("the real sender migrates");
    let (dst, rrep) = receiver
        .join()
        .unwrap()
        .expect("the receiver takes the sender");
    assert_same_memory(&src, &dst);
    assert_eq!(rrep.connections, 3);
    assert_eq!(rrep.transferred, report.stats.transferred);

    // Each intruder was told why, clearly.
    let told = |h: JoinHandle<Result<(), String>>| h.join().unwrap().expect_err("refused");
    let s = told(i_wrong_ca);
    assert!(s.contains("does not trust our certificate"), "{s}");
    let s = told(i_expired);
    assert!(s.contains("our certificate has expired"), "{s}");
    let s = told(i_no_cert);
    assert!(s.contains("requires a client certificate"), "{s}");

    let lines = refused.lock().unwrap().clone();
    eprintln!("refused:\n{}", lines.join("\n"));
    assert_eq!(lines.len(), 5, "{lines:#?}");
    for words in [
        &["not signed by a CA in --tls-ca"][..],
        &["sent nothing within 500ms", "dropped"],
        &["sent no certificate"],
        &["does not speak TLS"],
        &["outside its validity period"],
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains("127.0.0.1:") && words.iter().all(|w| l.contains(w))),
            "no refusal with {words:?}: {lines:#?}"
        );
    }
    drop((idle, plain));
}
