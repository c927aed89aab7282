//! The TLS options of `migrate send|receive` and `demo`: a demo over mutual TLS (PEM files
//! made with rcgen) and over a pre-shared key migrates its guest; plain TCP off loopback, a
//! short key and half a certificate set are refused before any work. The demos need
//! `/dev/kvm` (they fail, never skip, without it); the refusals do not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
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

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dirtylog-cli-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A CA and one certificate for 127.0.0.1 usable by both sides (server and client auth), as
/// ca.pem, cert.pem and key.pem in `d`.
fn write_pki(d: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(d.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(d.join("key.pem"), key.serialize_pem()).unwrap();
}

fn demo(extra: &[&str]) -> Value {
    let out = Command::new(EXE)
        .args(["demo", "--mem", "128M", "--working-set", "16M"])
        .args(["--run-for-ms", "300", "--no-plot", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo {extra:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

#[test]
fn demo_over_mutual_tls() {
    let _g = kvm();
    let d = dir("mtls");
    write_pki(&d);
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let v = demo(&[
        "--tls-cert",
        &p("cert.pem"),
        "--tls-key",
        &p("key.pem"),
        "--tls-ca",
        &p("ca.pem"),
    ]);
    assert_eq!(v["event"], "completed", "{v:#}");
    assert_eq!(v["guest-ran-on-destination"], true, "{v:#}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn demo_over_a_pre_shared_key() {
    let _g = kvm();
    let d = dir("psk");
    std::fs::write(d.join("psk"), [0x42u8; 32]).unwrap();
    let v = demo(&["--psk-file", &d.join("psk").to_string_lossy()]);
    assert_eq!(v["event"], "completed", "{v:#}");
    assert_eq!(v["guest-ran-on-destination"], true, "{v:#}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Run `dirtylog ARGS`, expecting exit status 2 and `words` in its stderr.
fn refused(args: &[&str], words: &[&str]) {
    let out = Command::new(EXE).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    for w in words {
        assert!(err.contains(w), "{args:?}: no {w:?} in {err}");
    }
}

#[test]
fn plain_tcp_off_loopback_is_refused() {
    refused(
        &["migrate", "receive", "--listen", "0.0.0.0:0"],
        &[
            "refusing plain TCP on --listen 0.0.0.0:0",
            "--psk-file",
            "--insecure",
        ],
    );
}

#[test]
fn insecure_plain_tcp_off_loopback_warns() {
    // It listens (on every address), warns, and gives up after the accept timeout.
    let out = Command::new(EXE)
        .args(["migrate", "receive", "--listen", "0.0.0.0:0", "--insecure"])
        .args(["--accept-timeout-s", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("warning: --insecure: plain TCP"), "{err}");
    assert!(stdout.starts_with("listening on 0.0.0.0:"), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{err}");
}

#[test]
fn bad_tls_options_are_refused_before_any_work() {
    let d = dir("bad");
    std::fs::write(d.join("short"), b"too short").unwrap();
    let short = d.join("short").to_string_lossy().into_owned();
    // Refused before booting a guest: no /dev/kvm needed for these.
    refused(
        &[
            "migrate",
            "send",
            "--to",
            "127.0.0.1:9",
            "--psk-file",
            &short,
        ],
        &["9 bytes, fewer than 32", "/dev/urandom"],
    );
    refused(
        &[
            "migrate",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--psk-file",
            &short,
        ],
        &["9 bytes, fewer than 32"],
    );
    let missing = d.join("missing.pem").to_string_lossy().into_owned();
    refused(
        &[
            "migrate",
            "send",
            "--to",
            "127.0.0.1:9",
            "--tls-cert",
            &missing,
            "--tls-key",
            &missing,
            "--tls-ca",
            &missing,
        ],
        &["--tls-cert", "missing.pem"],
    );
    // Where TLS cannot take effect (in-process migrations), or adds nothing.
    let key = d.join("key").to_string_lossy().into_owned();
    std::fs::write(&key, [7u8; 32]).unwrap();
    refused(
        &["run", "--psk-file", &key],
        &["no effect with `dirtylog run`"],
    );
    refused(
        &[
            "migrate",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--psk-file",
            &key,
            "--insecure",
        ],
        &["--insecure allows plain TCP"],
    );
    // Half a certificate set: clap says what is missing.
    let out = Command::new(EXE)
        .args([
            "migrate",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &missing,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--tls-key") && err.contains("--tls-ca"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A TLS receiver is not ended by connections that fail their handshake: a plain TCP client
/// (with terminal escapes in what it sends), a client with the wrong pre-shared key and an
/// idle connection are each refused (logged on stderr, escaped; the wrong key's client told
/// why), and the receiver waits on for the real sender until its accept timeout, then exits 1
/// listing the refusals, without ever having built a guest. No /dev/kvm needed: it never does.
#[test]
fn refused_connections_do_not_end_a_tls_receive() {
    use dirtylog_migrate::transport::tls::{self, TlsConfig};
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::process::Stdio;
    use std::time::Duration;

    let d = dir("refused");
    std::fs::write(d.join("psk"), [0x11u8; 32]).unwrap();
    let mut child = Command::new(EXE)
        .args(["migrate", "receive", "--listen", "127.0.0.1:0", "--json"])
        .args(["--psk-file", &d.join("psk").to_string_lossy()])
        .args(["--accept-timeout-s", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "listening", "{first}");
    let addr = first["address"].as_str().unwrap().to_string();

    let mut plain = TcpStream::connect(&addr).unwrap();
    plain.write_all(b"\x1b[2Jhello\n").unwrap();
    let wrong = TlsConfig::psk(&[0x22; 32]).unwrap();
    let told = tls::client(
        TcpStream::connect(&addr).unwrap(),
        &wrong,
        "x",
        Duration::from_secs(20),
        "receiver",
    )
    .map(drop)
    .expect_err("a wrong key is refused")
    .to_string();
    assert!(told.contains("refused our pre-shared-key proof"), "{told}");
    let idle = TcpStream::connect(&addr).unwrap();

    let last: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{last}\n{err}");
    assert_eq!(last["event"], "failed", "{last}");
    let e = last["error"].as_str().unwrap();
    assert!(
        e.contains("3 connections refused meanwhile, the first: TLS with 127.0.0.1:"),
        "{e}"
    );
    assert!(e.contains("does not speak TLS"), "{e}");
    assert!(e.contains("no connection arrived in time"), "{e}");
    let refusals: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("receiver: refused a connection: "))
        .collect();
    assert_eq!(refusals.len(), 3, "{err}");
    assert!(err.contains("pre-shared-key proof is wrong"), "{err}");
    assert!(err.contains("sent nothing within"), "{err}");
    assert!(!err.contains('\x1b'), "{err}");
    drop((plain, idle));
    let _ = std::fs::remove_dir_all(&d);
}
