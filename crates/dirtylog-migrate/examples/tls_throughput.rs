//! Bulk throughput of a migration over TLS (transport/tls.rs) against the same migration over
//! plain TCP, in the same process, alternating.
//!
//! ```text
//! cargo run --release -p dirtylog-migrate --example tls_throughput -- \
//!     [--mib 512] [--pairs 5] [--connections 1] [--ciphers aes128,aes256,chacha20]
//! ```
//!
//! For each of `--pairs` rounds, one idle software VM of `--mib` MiB with every page non-zero
//! (no zero-page shortcut) is migrated over 127.0.0.1 once in plain TCP and once over mutual
//! TLS with each cipher (certificates from a throwaway CA made with rcgen), the order rotated
//! every round so that none always goes first. Each run's figure is the engine's bulk pass
//! (round 0: frame, CRC, encrypt, send; receive, decrypt, CRC, validate, write, hash), timed
//! by the sender from the round's start to the last connection's `RoundEnd`. The destination
//! is built, and one word of each of its pages written, before the clock starts. Printed: each
//! run, then per cipher the median GiB/s and the median of the per-round ratios TLS / plain.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dirtylog_migrate::soft::{SoftConfig, SoftVm, Workload};
use dirtylog_migrate::transport::tls::{self, TlsCipher, TlsConfig, TlsListener};
use dirtylog_migrate::wire::{Region, StreamHeader};
use dirtylog_migrate::{
    receive, send, send_on, MigrationMemory, MigrationTarget, ReceiveConfig, SendConfig,
    SendReport, TrackerKind,
};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::PrivateKeyDer;

type Error = Box<dyn std::error::Error + Send + Sync>;

const PAGE: usize = 4096;

struct Args {
    mib: u64,
    pairs: usize,
    connections: usize,
    ciphers: Vec<TlsCipher>,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        mib: 512,
        pairs: 5,
        connections: 1,
        ciphers: TlsCipher::ALL.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => a.mib = value()?.parse()?,
            "--pairs" => a.pairs = value()?.parse()?,
            "--connections" => a.connections = value()?.parse()?,
            "--ciphers" => {
                a.ciphers = value()?
                    .split(',')
                    .map(|c| match c {
                        "aes128" => Ok(TlsCipher::Aes128Gcm),
                        "aes256" => Ok(TlsCipher::Aes256Gcm),
                        "chacha20" => Ok(TlsCipher::Chacha20Poly1305),
                        c => Err(format!("cipher {c}: use aes128, aes256 or chacha20")),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }
    if a.mib == 0 || a.pairs == 0 || a.connections == 0 || a.connections > 64 {
        return Err("--mib and --pairs at least 1, --connections 1..=64".into());
    }
    Ok(a)
}

/// Both sides' TLS settings: certificates from one throwaway CA.
fn pki() -> Result<(TlsConfig, TlsConfig), Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key)?;
    let leaf = |names: Vec<String>, eku| -> Result<TlsConfig, Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names)?;
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        Ok(TlsConfig::mutual(
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der())?,
            vec![ca.der().clone()],
        )?)
    };
    Ok((
        leaf(
            vec!["127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?,
        leaf(vec!["sender".into()], ExtendedKeyUsagePurpose::ClientAuth)?,
    ))
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    let size = args.mib.checked_mul(1 << 20).ok_or("--mib too large")?;
    let regions = vec![Region {
        slot: 0,
        gpa: 0,
        size,
    }];
    let (server, client) = pki()?;
    let source = || {
        SoftVm::source(&SoftConfig {
            page_size: PAGE as u32,
            regions: regions.clone(),
            vcpus: 1,
            tracker: TrackerKind::ClearLog,
            workload: Workload::idle(),
            nonzero_percent: 100,
        })
    };
    let header = StreamHeader::new(PAGE as u32, 1, regions.clone())?;
    // Index 0: plain; then one per cipher.
    let mut variants: Vec<Option<TlsCipher>> = vec![None];
    variants.extend(args.ciphers.iter().copied().map(Some));
    let name = |v: Option<TlsCipher>| v.map_or("plain TCP".to_string(), |c| format!("TLS {c}"));
    println!(
        "guest {} MiB, all pages non-zero, {} connection(s), {} rounds of {} runs (order \
         rotated each round), bulk pass GiB/s",
        args.mib,
        args.connections,
        args.pairs,
        variants.len()
    );
    let gib = |b: f64| b / f64::from(1 << 30);
    let mut speed: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..args.pairs {
        let mut this = vec![0.0; variants.len()];
        for k in 0..variants.len() {
            let v = (round + k) % variants.len();
            let tls = match variants[v] {
                None => None,
                Some(c) => Some((server.only_cipher(c)?, client.only_cipher(c)?)),
            };
            let target = SoftVm::target(&header, TrackerKind::ClearLog)?;
            let mem = MigrationTarget::memory(&target)
                .region_memory(0)
                .ok_or("the target has no region 0")?;
            prefault(mem.as_ptr(), mem.len());
            let src = source()?;
            let report = run(&src, target, args.connections, tls)?;
            let bulk = report.rounds.first().ok_or("no bulk round")?;
            if bulk.stats.zero_pages != 0 {
                return Err("zero pages in the bulk pass".into());
            }
            this[v] = bulk.transferred as f64 / (bulk.stats.send_time_us.max(1) as f64 / 1e6);
            println!(
                "  round {round}: {:<24} {:.2} GiB/s",
                name(variants[v]),
                gib(this[v])
            );
        }
        for v in 0..variants.len() {
            speed[v].push(this[v]);
            ratio[v].push(this[v] / this[0]);
        }
    }
    println!("| transport | median GiB/s (min-max) | median ratio to plain (min-max) |");
    println!("|---|---|---|");
    for v in 0..variants.len() {
        println!(
            "| {} | {:.2} ({:.2}-{:.2}) | {:.2} ({:.2}-{:.2}) |",
            name(variants[v]),
            gib(median(&speed[v])),
            gib(min(&speed[v])),
            gib(max(&speed[v])),
            median(&ratio[v]),
            min(&ratio[v]),
            max(&ratio[v]),
        );
    }
    Ok(())
}

/// One migration of `src` into `target` over `n` loopback connections, plain or TLS.
fn run(
    src: &SoftVm,
    target: SoftVm,
    n: usize,
    tls: Option<(TlsConfig, TlsConfig)>,
) -> Result<SendReport, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let config = SendConfig {
        connections: n,
        ..SendConfig::default()
    };
    let (server, client) = match tls {
        Some((s, c)) => (Some(s), Some(c)),
        None => (None, None),
    };
    let receiver = std::thread::spawn(move || {
        let config = ReceiveConfig::default();
        match server {
            Some(s) => {
                receive(&TlsListener::new(listener, s), &config, move |_| Ok(target)).map(|_| ())
            }
            None => receive(&listener, &config, move |_| Ok(target)).map(|_| ()),
        }
    });
    let report = match client {
        Some(c) => {
            let streams = tls::connect(
                &addr.into(),
                n,
                Duration::from_secs(5),
                Duration::from_secs(60),
                &c,
                "127.0.0.1",
            )?;
            send_on(src, streams, &config, &mut |_| {})?
        }
        None => send(src, addr, &config, &mut |_| {})?,
    };
    receiver.join().map_err(|_| "receiver panicked")??;
    Ok(report)
}

/// Write one word of every page of `len` bytes at `ptr` (a region of a VM nobody runs), so
/// that the kernel has backed every page before a run.
fn prefault(ptr: *mut u8, len: usize) {
    for offset in (0..len).step_by(PAGE) {
        // SAFETY: `offset + 8 <= len` inside a live, 8-byte aligned region of a target VM that
        // is not running and that no other thread accesses yet; the store is atomic, as every
        // access of the software VM to its memory is.
        let word = unsafe { &*ptr.add(offset).cast::<AtomicU64>() };
        word.store(0, Ordering::Relaxed);
    }
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn min(v: &[f64]) -> f64 {
    sorted(v).first().copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    sorted(v).last().copied().unwrap_or(f64::NAN)
}
