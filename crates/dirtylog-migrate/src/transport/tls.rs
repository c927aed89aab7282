//! Authenticated, encrypted connections with rustls (TLS 1.3 only, ring's primitives): a
//! [`TlsStream`] over any [`Transport`] is itself a [`Transport`], so the engines run over it
//! unchanged ([`send_on`](crate::send_on), [`receive`](crate::receive) with a
//! [`TlsListener`]).
//!
//! Two ways to authenticate, both on every connection separately ([`TlsConfig`]):
//! - **Mutual TLS** ([`TlsConfig::mutual`]): each side has a certificate and key and the CA
//!   that signed the other side's certificate. The receiver requires and checks the sender's
//!   certificate (rustls' `WebPkiClientVerifier`); the sender checks the receiver's
//!   certificate and that it is for the server name it was given.
//! - **Pre-shared key** ([`TlsConfig::psk`], at least [`MIN_PSK_LEN`] bytes): rustls has no
//!   external PSKs, so the receiver presents a throwaway self-signed certificate that the
//!   sender does not check, and then, inside the encrypted channel and before any migration
//!   byte, each side proves that it knows the key *for this TLS session*:
//!   `HMAC-SHA256(key, role || exporter)`, where `exporter` is 32 bytes of the session's
//!   keying material exporter (RFC 8446 §7.5, label [`PSK_EXPORTER_LABEL`]) and `role` says
//!   who speaks. A man in the middle runs two TLS sessions with two different exporters, so
//!   the proofs it relays do not verify; a recorded session replayed meets fresh handshake
//!   secrets. The receiver checks the sender's proof (constant time) before it sends its
//!   own, so someone who merely reaches the port learns nothing about the key.
//!
//! After the handshake (and the proofs) the receiver sends one status byte: so a sender
//! whose certificate or proof was refused learns it, with the reason, when it connects, not
//! halfway through a migration. See docs/SECURITY.md for the threat model.
//!
//! **Concurrency.** The engines write a connection from one thread while another reads the
//! replies, so every clone shares one rustls connection state behind a mutex, which is never
//! held across a blocking socket call:
//! - a reader (readers are serialized among themselves) reads the socket *without* the state
//!   lock, then locks it to feed the ciphertext and take the plaintext;
//! - a writer locks the state, encrypts into a buffer and takes a ticket, releases the
//!   state, then waits for its ticket's turn and writes: records reach the socket in the
//!   order they were encrypted, and a writer blocked on a full socket blocks neither the
//!   reader nor the state.
//!
//! [`Transport::shutdown`] shuts the socket down: a blocked reader gets end-of-file, a
//! blocked writer an error, and the writers waiting for their turn follow.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{ring as provider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection,
    DigitallySignedStruct, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};

use super::{Address, Listener, Stream, Transport};
use crate::error::MigrateError;

/// The shortest pre-shared key accepted, in bytes (256 bits).
pub const MIN_PSK_LEN: usize = 32;
/// The label of the keying material exporter that binds a pre-shared-key proof to its TLS
/// session.
pub const PSK_EXPORTER_LABEL: &[u8] = b"dirtylog psk binding v1";
/// The role string the sender's proof starts with.
const SENDER_ROLE: &[u8] = b"dirtylog migration sender";
/// The role string the receiver's proof starts with.
const RECEIVER_ROLE: &[u8] = b"dirtylog migration receiver";
/// The receiver's status byte: accepted.
const STATUS_OK: u8 = 1;
/// The receiver's status byte: the sender's pre-shared-key proof was wrong.
const STATUS_BAD_PROOF: u8 = 2;
/// The server name a sender uses in pre-shared-key mode (the certificate is not checked).
const PSK_SERVER_NAME: &str = "dirtylog-psk";
/// Default bound on a whole handshake, proofs included.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest plaintext encrypted in one go (then written, then the next).
const WRITE_CHUNK: usize = 256 << 10;
/// Encryption buffers kept for reuse per connection.
const SPARE_BUFFERS: usize = 4;
/// Ciphertext read from the socket at a time.
const READ_CHUNK: usize = 256 << 10;

/// A TLS 1.3 AEAD: which one the connections may use ([`TlsConfig::only_cipher`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsCipher {
    /// TLS_AES_128_GCM_SHA256.
    Aes128Gcm,
    /// TLS_AES_256_GCM_SHA384.
    Aes256Gcm,
    /// TLS_CHACHA20_POLY1305_SHA256.
    Chacha20Poly1305,
}

impl TlsCipher {
    /// Every cipher, fastest with AES instructions first.
    pub const ALL: [TlsCipher; 3] = [
        TlsCipher::Aes128Gcm,
        TlsCipher::Aes256Gcm,
        TlsCipher::Chacha20Poly1305,
    ];

    fn suite(self) -> rustls::SupportedCipherSuite {
        match self {
            TlsCipher::Aes128Gcm => provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
            TlsCipher::Aes256Gcm => provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
            TlsCipher::Chacha20Poly1305 => provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        }
    }
}

impl fmt::Display for TlsCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsCipher::Aes128Gcm => "AES-128-GCM",
            TlsCipher::Aes256Gcm => "AES-256-GCM",
            TlsCipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        })
    }
}

/// Why TLS could not be set up, or a handshake failed. Every message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{what} {path}: {why}")]
    File {
        /// Which file: `certificate (--tls-cert)`, ...
        what: &'static str,
        /// Its path.
        path: String,
        /// What was wrong, and what to do.
        why: String,
    },
    /// The pre-shared key is too short.
    #[error(
        "the pre-shared key{from} has {len} bytes, fewer than {MIN_PSK_LEN}: make one with \
         `head -c 32 /dev/urandom > FILE` (or `openssl rand 32 > FILE`) and give the same file \
         to both sides"
    )]
    ShortPsk {
        /// ` in FILE`, or empty.
        from: String,
        /// Its length.
        len: usize,
    },
    /// The certificates or key were refused by rustls.
    #[error("{0}")]
    Config(String),
    /// The handshake with a peer failed.
    #[error("TLS with {peer}: {why}")]
    Handshake {
        /// The peer's address, or `the peer`.
        peer: String,
        /// What went wrong, and what to do.
        why: String,
    },
}

impl TlsError {
    fn into_io(self) -> io::Error {
        let kind = match &self {
            TlsError::Handshake { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, self)
    }
}

/// How the connections are authenticated.
enum Mode {
    Mutual,
    Psk(Vec<u8>),
}

/// The TLS settings of one side (cheap to clone): how it authenticates, built once into
/// rustls configurations for both roles. TLS 1.3 only; no session resumption (every
/// connection runs a full handshake with fresh keys) and no early data.
#[derive(Clone)]
pub struct TlsConfig {
    mode: Arc<Mode>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    cipher: Option<TlsCipher>,
    /// For [`TlsConfig::only_cipher`]: what the configurations are built from.
    material: Arc<Material>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        write!(f, "TlsConfig({}", self.describe())?;
        if let Some(c) = self.cipher {
            write!(f, ", {c} only")?;
        }
        f.write_str(")")
    }
}

struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The CA (mutual TLS); `None` in pre-shared-key mode.
    roots: Option<Arc<RootCertStore>>,
}

fn file_error(what: &'static str, path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

impl TlsConfig {
    /// Mutual TLS: this side's certificate `chain` (its own first) and `key`, and the
    /// certificates of the CA(s) that signed the peer's (`ca`, at least one).
    pub fn mutual(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        if chain.is_empty() {
            return Err(TlsError::Config("no certificate given".into()));
        }
        if ca.is_empty() {
            return Err(TlsError::Config("no CA certificate given".into()));
        }
        let mut roots = RootCertStore::empty();
        for (i, c) in ca.into_iter().enumerate() {
            roots.add(c).map_err(|e| {
                TlsError::Config(format!("CA certificate {i} is not usable as a CA: {e}"))
            })?;
        }
        Self::build(
            Mode::Mutual,
            Material {
                chain,
                key,
                roots: Some(Arc::new(roots)),
            },
            None,
        )
    }

    /// [`TlsConfig::mutual`] from PEM files: `cert` (the certificate, then any
    /// intermediates), `key` (PKCS#8, PKCS#1 or SEC1), `ca` (one or more CA certificates).
    pub fn mutual_from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let certs = |what: &'static str, path: &Path| {
            let list: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| file_error(what, path, pem_error(e)))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_error(what, path, pem_error(e)))?;
            if list.is_empty() {
                return Err(file_error(
                    what,
                    path,
                    "no CERTIFICATE block in it (a PEM file with -----BEGIN CERTIFICATE-----)",
                ));
            }
            Ok(list)
        };
        let chain = certs("certificate (--tls-cert)", cert)?;
        let ca_list = certs("CA certificate (--tls-ca)", ca)?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            file_error(
                "private key (--tls-key)",
                key,
                match e {
                    rustls::pki_types::pem::Error::NoItemsFound => {
                        "no PRIVATE KEY block in it (PKCS#8, RSA or EC, PEM)".to_string()
                    }
                    e => pem_error(e),
                },
            )
        })?;
        Self::mutual(chain, private, ca_list)
    }

    /// Pre-shared key: `key` is a secret both sides have, at least [`MIN_PSK_LEN`] bytes
    /// (random bytes; a password is not enough).
    pub fn psk(key: &[u8]) -> Result<Self, TlsError> {
        Self::psk_inner(key, String::new())
    }

    /// [`TlsConfig::psk`] with the key read from a file (all its bytes).
    pub fn psk_from_file(path: &Path) -> Result<Self, TlsError> {
        let key =
            std::fs::read(path).map_err(|e| file_error("pre-shared key (--psk-file)", path, e))?;
        Self::psk_inner(&key, format!(" in {}", path.display()))
    }

    fn psk_inner(key: &[u8], from: String) -> Result<Self, TlsError> {
        if key.len() < MIN_PSK_LEN {
            return Err(TlsError::ShortPsk {
                from,
                len: key.len(),
            });
        }
        // The receiver's throwaway certificate: only its key matters (it signs the
        // handshake); the proofs authenticate.
        let cert = rcgen::generate_simple_self_signed(vec![PSK_SERVER_NAME.to_string()])
            .map_err(|e| TlsError::Config(format!("generating a certificate: {e}")))?;
        let key_der = PrivateKeyDer::try_from(cert.key_pair.serialize_der())
            .map_err(|e| TlsError::Config(format!("generating a certificate: {e}")))?;
        Self::build(
            Mode::Psk(key.to_vec()),
            Material {
                chain: vec![cert.cert.der().clone()],
                key: key_der,
                roots: None,
            },
            None,
        )
    }

    /// The same settings with only `cipher` offered and accepted (for measurements; both
    /// sides must allow it).
    pub fn only_cipher(&self, cipher: TlsCipher) -> Result<Self, TlsError> {
        let mode = match &*self.mode {
            Mode::Mutual => Mode::Mutual,
            Mode::Psk(k) => Mode::Psk(k.clone()),
        };
        let material = Material {
            chain: self.material.chain.clone(),
            key: self.material.key.clone_key(),
            roots: self.material.roots.clone(),
        };
        Self::build(mode, material, Some(cipher))
    }

    /// `mutual TLS` or `TLS with a pre-shared key`.
    pub fn describe(&self) -> &'static str {
        match *self.mode {
            Mode::Mutual => "mutual TLS",
            Mode::Psk(_) => "TLS with a pre-shared key",
        }
    }

    /// Whether this is the pre-shared-key mode.
    pub fn is_psk(&self) -> bool {
        matches!(*self.mode, Mode::Psk(_))
    }

    fn build(mode: Mode, material: Material, cipher: Option<TlsCipher>) -> Result<Self, TlsError> {
        let mut p = provider::default_provider();
        p.cipher_suites = match cipher {
            Some(c) => vec![c.suite()],
            None => TlsCipher::ALL.iter().map(|c| c.suite()).collect(),
        };
        let p = Arc::new(p);
        let versions = &[&rustls::version::TLS13];
        let err = |e: rustls::Error| TlsError::Config(format!("TLS setup: {e}"));

        let server = ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(versions)
            .map_err(err)?;
        let server = match &material.roots {
            Some(roots) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
                        .build()
                        .map_err(|e| TlsError::Config(format!("the CA (--tls-ca): {e}")))?;
                server.with_client_cert_verifier(verifier)
            }
            None => server.with_no_client_auth(),
        };
        let mut server = server
            .with_single_cert(material.chain.clone(), material.key.clone_key())
            .map_err(|e| TlsError::Config(format!("the certificate and key: {e}")))?;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        server.max_early_data_size = 0;

        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(versions)
            .map_err(err)?;
        let mut client = match &material.roots {
            Some(roots) => client
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
                .map_err(|e| TlsError::Config(format!("the certificate and key: {e}")))?,
            None => client
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert(
                    p.signature_verification_algorithms,
                )))
                .with_no_client_auth(),
        };
        client.resumption = Resumption::disabled();
        client.enable_early_data = false;
        Ok(TlsConfig {
            mode: Arc::new(mode),
            client: Arc::new(client),
            server: Arc::new(server),
            cipher,
            material: Arc::new(material),
        })
    }
}

/// Pre-shared-key mode: the receiver's certificate is a throwaway, not checked; the
/// handshake's signature still is (so the certificate's key signed this handshake), and the
/// proofs that follow authenticate.
#[derive(Debug)]
struct AnyServerCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is not enabled.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Which end of a connection this is, for the proofs and the messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// `migrate send`: the TLS client.
    Sender,
    /// `migrate receive`: the TLS server.
    Receiver,
}

/// What to do about a rustls error seen by `side`.
fn explain(e: &rustls::Error, side: Side) -> String {
    let (peer, our_flags) = match side {
        Side::Sender => ("receiver", "--tls-cert/--tls-key"),
        Side::Receiver => ("sender", "--tls-cert/--tls-key"),
    };
    match e {
        rustls::Error::InvalidCertificate(c) => {
            let what = format!("the {peer}'s certificate was refused ({c:?})");
            let todo = match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    "it is not signed by a CA in --tls-ca: give both sides certificates from \
                     the same CA, and that CA's certificate as --tls-ca"
                        .to_string()
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => format!(
                    "it is outside its validity period: issue the {peer} a new certificate \
                     (and check both clocks)"
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "it is not issued for the name the sender expects: pass \
                     --tls-server-name with a name (DNS or IP) that is in the receiver's \
                     certificate"
                        .to_string()
                }
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => {
                    "its extended key usage does not allow this role: the receiver needs \
                         serverAuth, the sender clientAuth"
                        .to_string()
                }
                _ => format!("check the {peer}'s certificate and --tls-ca"),
            };
            format!("{what}: {todo}")
        }
        rustls::Error::AlertReceived(a) => {
            let todo = match a {
                AlertDescription::UnknownCA | AlertDescription::DecryptError => format!(
                    "the {peer} does not trust our certificate: our {our_flags} must be signed \
                     by the CA the {peer} has as --tls-ca"
                ),
                AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
                    format!(
                        "the {peer} does not trust our certificate: it must be signed by the CA \
                         the {peer} has as --tls-ca{}",
                        if side == Side::Receiver {
                            ", and name what the sender expects (its --tls-server-name, by \
                             default the host of its --to)"
                        } else {
                            ""
                        }
                    )
                }
                AlertDescription::CertificateExpired => format!(
                    "our certificate has expired (or is not valid yet) for the {peer}: renew \
                     {our_flags}"
                ),
                AlertDescription::CertificateRequired => format!(
                    "the {peer} requires a client certificate: use mutual TLS (--tls-cert, \
                     --tls-key, --tls-ca) on both sides, or --psk-file on both"
                ),
                AlertDescription::HandshakeFailure | AlertDescription::ProtocolVersion => {
                    "no common TLS settings: both sides need TLS 1.3 and a common cipher"
                        .to_string()
                }
                _ => format!("the {peer} refused the handshake"),
            };
            format!("the {peer} sent alert {a:?}: {todo}")
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "the {peer} does not speak TLS ({e}): start both sides with the same TLS options \
             (--tls-cert/--tls-key/--tls-ca, or --psk-file), or neither"
        ),
        rustls::Error::NoCertificatesPresented => format!(
            "the {peer} sent no certificate: with mutual TLS both sides need --tls-cert, \
             --tls-key and --tls-ca (is the {peer} using --psk-file?)"
        ),
        rustls::Error::PeerIncompatible(_) | rustls::Error::PeerMisbehaved(_) => format!(
            "the {peer} is not compatible ({e}): both sides need TLS 1.3 and the same mode \
             (mutual TLS, or --psk-file)"
        ),
        e => format!("{e}"),
    }
}

/// What a plain I/O error during a handshake means.
fn explain_io(e: &io::Error, side: Side) -> String {
    let peer = match side {
        Side::Sender => "receiver",
        Side::Receiver => "sender",
    };
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => format!(
            "the {peer} closed the connection during the handshake ({e}): is it running \
             without TLS (then start both sides with the same --tls-*/--psk-file options), or \
             did it refuse us (see its output)?"
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
            "the handshake timed out: the {peer} did not answer (is it a dirtylog migration \
             endpoint with the same TLS options?)"
        ),
        _ => e.to_string(),
    }
}

/// Run the handshake and the checks after it on a blocking `sock`.
fn handshake<S: Read + Write>(
    conn: &mut Connection,
    sock: &mut S,
    mode: &Mode,
    side: Side,
    peer: &str,
) -> Result<(), TlsError> {
    let fail = |why: String| TlsError::Handshake {
        peer: peer.to_string(),
        why,
    };
    // rustls::Error comes wrapped in io::Error(InvalidData) from complete_io.
    let io_fail = |e: io::Error| {
        let why = match e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) {
            Some(tls) => explain(tls, side),
            None => explain_io(&e, side),
        };
        fail(why)
    };
    while conn.is_handshaking() {
        conn.complete_io(sock).map_err(io_fail)?;
    }
    let mut stream = HandshakeIo { conn, sock };
    match (mode, side) {
        (Mode::Mutual, Side::Sender) => {
            let mut status = [0u8];
            stream.read_exact(&mut status).map_err(io_fail)?;
            if status[0] != STATUS_OK {
                return Err(fail(format!(
                    "unexpected status {} from the receiver",
                    status[0]
                )));
            }
        }
        (Mode::Mutual, Side::Receiver) => {
            stream.write_all(&[STATUS_OK]).map_err(io_fail)?;
        }
        (Mode::Psk(key), Side::Sender) => {
            let exporter = exporter(stream.conn).map_err(|e| fail(e.to_string()))?;
            let ours = proof(key, SENDER_ROLE, &exporter);
            stream.write_all(ours.as_ref()).map_err(io_fail)?;
            let mut status = [0u8];
            stream.read_exact(&mut status).map_err(io_fail)?;
            match status[0] {
                STATUS_OK => {}
                STATUS_BAD_PROOF => {
                    return Err(fail(
                        "the receiver refused our pre-shared-key proof: the two sides have \
                         different keys (give both the same --psk-file)"
                            .into(),
                    ))
                }
                s => return Err(fail(format!("unexpected status {s} from the receiver"))),
            }
            let mut theirs = [0u8; 32];
            stream.read_exact(&mut theirs).map_err(io_fail)?;
            verify_proof(key, RECEIVER_ROLE, &exporter, &theirs).map_err(|()| {
                fail(
                    "the receiver's pre-shared-key proof is wrong: it does not have our key (a \
                     different --psk-file, or someone in between)"
                        .into(),
                )
            })?;
        }
        (Mode::Psk(key), Side::Receiver) => {
            let exporter = exporter(stream.conn).map_err(|e| fail(e.to_string()))?;
            let mut theirs = [0u8; 32];
            stream.read_exact(&mut theirs).map_err(io_fail)?;
            if verify_proof(key, SENDER_ROLE, &exporter, &theirs).is_err() {
                let _ = stream.write_all(&[STATUS_BAD_PROOF]);
                stream.conn.send_close_notify();
                let _ = stream.flush();
                return Err(fail(
                    "the sender's pre-shared-key proof is wrong: it does not have our key (give \
                     both sides the same --psk-file)"
                        .into(),
                ));
            }
            let ours = proof(key, RECEIVER_ROLE, &exporter);
            stream.write_all(&[STATUS_OK]).map_err(io_fail)?;
            stream.write_all(ours.as_ref()).map_err(io_fail)?;
        }
    }
    stream.flush().map_err(io_fail)
}

/// Blocking reads and writes on a connection being set up, before it is split between
/// threads (`rustls::Stream` for the `Connection` enum).
struct HandshakeIo<'a, S> {
    conn: &'a mut Connection,
    sock: &'a mut S,
}

impl<S: Read + Write> HandshakeIo<'_, S> {
    fn send_pending(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(self.sock)?;
        }
        self.sock.flush()
    }
}

impl<S: Read + Write> Read for HandshakeIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            self.send_pending()?;
            if self.conn.read_tls(self.sock)? == 0 {
                // Let rustls tell a clean close from a truncation.
                self.conn
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                return match self.conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    r => r,
                };
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert, if any, then the error.
                let _ = self.send_pending();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

impl<S: Read + Write> Write for HandshakeIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.send_pending()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

/// The session's exporter value for the pre-shared-key proofs.
fn exporter(conn: &Connection) -> Result<[u8; 32], rustls::Error> {
    conn.export_keying_material([0u8; 32], PSK_EXPORTER_LABEL, None)
}

/// `HMAC-SHA256(key, role || exporter)`.
fn proof(key: &[u8], role: &[u8], exporter: &[u8; 32]) -> ring::hmac::Tag {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    ctx.update(role);
    ctx.update(exporter);
    ctx.sign()
}

/// Check a peer's proof in constant time.
fn verify_proof(key: &[u8], role: &[u8], exporter: &[u8; 32], tag: &[u8]) -> Result<(), ()> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut msg = Vec::with_capacity(role.len() + exporter.len());
    msg.extend_from_slice(role);
    msg.extend_from_slice(exporter);
    ring::hmac::verify(&k, &msg, tag).map_err(|_| ())
}

/// Run the sender's side of the handshake on a connected, blocking `sock`, authenticating the
/// receiver as `server_name` (a DNS name or an IP address; not checked in pre-shared-key
/// mode). `timeout` bounds each socket read and write of the handshake; the socket's
/// timeouts are cleared afterwards.
pub fn client<S: Transport>(
    sock: S,
    tls: &TlsConfig,
    server_name: &str,
    timeout: Duration,
    peer: &str,
) -> Result<TlsStream<S>, TlsError> {
    let conn = client_connection(tls, server_name)?;
    let mut conn = Connection::Client(conn);
    let mut sock = sock;
    with_timeout(&sock, Some(timeout.max(Duration::from_millis(1))), peer)?;
    handshake(&mut conn, &mut sock, &tls.mode, Side::Sender, peer)?;
    with_timeout(&sock, None, peer)?;
    TlsStream::new(conn, sock, peer.to_string(), tls, None)
}

/// The client side of a TLS session to `server_name` (a fixed name in PSK mode, where the
/// certificate is not checked), before any byte is exchanged.
fn client_connection(tls: &TlsConfig, server_name: &str) -> Result<ClientConnection, TlsError> {
    let name = if tls.is_psk() {
        PSK_SERVER_NAME
    } else {
        server_name
    };
    let name = ServerName::try_from(name.to_string()).map_err(|e| {
        TlsError::Config(format!(
            "server name {server_name:?}: {e} (use a DNS name or an IP address, \
             --tls-server-name)"
        ))
    })?;
    ClientConnection::new(tls.client.clone(), name)
        .map_err(|e| TlsError::Config(format!("TLS setup: {e}")))
}

/// [`client`] with the handshake deferred to the first read or write (which then fail with
/// its error), under the socket's own timeouts. For the second and later connections of a
/// migration: the receiver accepts them only after it has read the first one's `Hello`.
pub fn client_deferred<S: Transport>(
    sock: S,
    tls: &TlsConfig,
    server_name: &str,
    peer: &str,
) -> Result<TlsStream<S>, TlsError> {
    let conn = client_connection(tls, server_name)?;
    TlsStream::new(
        Connection::Client(conn),
        sock,
        peer.to_string(),
        tls,
        Some(Side::Sender),
    )
}

/// Run the receiver's side of the handshake on an accepted, blocking `sock` (see [`client`]).
/// `timeout` bounds the whole handshake, proofs included, however slowly the peer sends its
/// bytes: someone who merely reaches the port cannot hold the receiver longer.
pub fn server<S: Transport>(
    sock: S,
    tls: &TlsConfig,
    timeout: Duration,
    peer: &str,
) -> Result<TlsStream<S>, TlsError> {
    let conn = ServerConnection::new(tls.server.clone())
        .map_err(|e| TlsError::Config(format!("TLS setup: {e}")))?;
    let mut conn = Connection::Server(conn);
    let mut sock = sock;
    with_timeout(&sock, Some(timeout.max(Duration::from_millis(1))), peer)?;
    let mut bounded = Deadline {
        until: Instant::now().checked_add(timeout),
        sock: &mut sock,
    };
    handshake(&mut conn, &mut bounded, &tls.mode, Side::Receiver, peer)?;
    with_timeout(&sock, None, peer)?;
    TlsStream::new(conn, sock, peer.to_string(), tls, None)
}

/// A socket whose every read and write is bounded by what is left until `until` (`None`:
/// by the socket's own timeouts), so that a whole exchange is bounded.
struct Deadline<'a, S> {
    sock: &'a mut S,
    until: Option<Instant>,
}

impl<S: Transport> Deadline<'_, S> {
    fn arm(&self) -> io::Result<()> {
        let Some(until) = self.until else {
            return Ok(());
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake's deadline passed",
            ));
        }
        self.sock.set_read_timeout(Some(left))?;
        self.sock.set_write_timeout(Some(left))
    }
}

impl<S: Transport> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.sock.read(buf)
    }
}

impl<S: Transport> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

fn with_timeout<S: Transport>(sock: &S, t: Option<Duration>, peer: &str) -> Result<(), TlsError> {
    sock.prepare()
        .and_then(|()| sock.set_read_timeout(t))
        .and_then(|()| sock.set_write_timeout(t))
        .map_err(|e| TlsError::Handshake {
            peer: peer.to_string(),
            why: format!("setting up the socket: {e}"),
        })
}

/// Open `n` TLS connections to `addr` ([`connect`](super::connect), then a handshake on
/// each, authenticating the receiver as `server_name`), each with the given read and write
/// timeout. Every connection is its own TLS session, authenticated on its own.
pub fn connect(
    addr: &Address,
    n: usize,
    timeout: Duration,
    io_timeout: Duration,
    tls: &TlsConfig,
    server_name: &str,
) -> Result<Vec<TlsStream<Stream>>, MigrateError> {
    let plain = super::connect(addr, n, timeout, io_timeout)?;
    plain
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let what = || format!("connection {i} to {addr}");
            // The receiver accepts connection i + 1 only once it has read connection i's
            // Hello: only the first handshake can complete here (and reports a refusal at
            // once); the others run when the engine first writes them.
            let stream = if i == 0 {
                client(
                    s,
                    tls,
                    server_name,
                    timeout.max(DEFAULT_HANDSHAKE_TIMEOUT),
                    &addr.to_string(),
                )
            } else {
                client_deferred(s, tls, server_name, &addr.to_string())
            }
            .map_err(|e| MigrateError::Connect {
                what: what(),
                source: e.into_io(),
            })?;
            super::configure(&stream, io_timeout).map_err(|source| MigrateError::Connect {
                what: what(),
                source,
            })?;
            Ok(stream)
        })
        .collect()
}

/// A [`Listener`] whose connections are [`TlsStream`]s: each accepted connection runs the
/// receiver's handshake (the whole of it bounded by the handshake timeout; a connection that
/// sends nothing within it is not even answered) before it is handed over. A failed
/// handshake is returned as the accept's error (`PermissionDenied`, with the reason):
/// [`receive`](crate::receive) then drops that connection and goes on accepting.
#[derive(Debug)]
pub struct TlsListener<L> {
    inner: L,
    tls: TlsConfig,
    handshake_timeout: Duration,
}

impl<L: Listener> TlsListener<L> {
    /// Wrap `inner`; handshakes are bounded by [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn new(inner: L, tls: TlsConfig) -> Self {
        TlsListener {
            inner,
            tls,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Bound each handshake's socket reads and writes by `timeout` instead.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The plain listener.
    pub fn get_ref(&self) -> &L {
        &self.inner
    }
}

impl<L: Listener> Listener for TlsListener<L> {
    type Stream = TlsStream<L::Stream>;

    fn accept_before(&self, deadline: Instant) -> io::Result<Self::Stream> {
        let sock = self.inner.accept_before(deadline)?;
        let peer = peer_name(&sock);
        let refused = |why: String| {
            TlsError::Handshake {
                peer: peer.clone(),
                why,
            }
            .into_io()
        };
        // A sender starts its handshake at once: a silent connection is dropped unanswered.
        match sock.wait_readable(self.handshake_timeout) {
            Ok(true) => {}
            Ok(false) => {
                return Err(refused(format!(
                    "it sent nothing within {:?} (a sender starts its handshake at once); \
                     dropped",
                    self.handshake_timeout
                )))
            }
            Err(e) => return Err(refused(explain_io(&e, Side::Receiver))),
        }
        server(sock, &self.tls, self.handshake_timeout, &peer).map_err(TlsError::into_io)
    }
}

/// The peer's address for messages, when the transport knows it.
fn peer_name<S: 'static>(sock: &S) -> String {
    peer_addr(sock).map_or_else(|| "the sender".to_string(), |a| a.to_string())
}

/// The peer's TCP address, when `sock` is a TCP connection (plain or in a [`TlsStream`]).
pub(crate) fn peer_addr<S: 'static>(sock: &S) -> Option<SocketAddr> {
    let any: &dyn std::any::Any = sock;
    if let Some(Stream::Tcp(t)) = any.downcast_ref::<Stream>() {
        t.peer_addr().ok()
    } else if let Some(t) = any.downcast_ref::<std::net::TcpStream>() {
        t.peer_addr().ok()
    } else if let Some(t) = any.downcast_ref::<TlsStream<Stream>>() {
        peer_addr(&*lock(&t.inner.control))
    } else if let Some(t) = any.downcast_ref::<TlsStream<std::net::TcpStream>>() {
        peer_addr(&*lock(&t.inner.control))
    } else {
        None
    }
}

/// Whether plain TCP to or on an address stays on this host (defined beside [`Address`] in
/// the transport module): anything else crosses a network and should use TLS.
pub use super::is_local;

/// The connection state shared by every clone of a [`TlsStream`].
struct State {
    conn: Connection,
    /// The next write ticket to hand out (tickets are taken while encrypting, under this
    /// lock, so their order is the order of the records).
    next_ticket: u64,
    /// A fatal TLS error seen by a reader: every later read fails the same way.
    failed: Option<String>,
}

/// The reading side: the socket handle readers use, and ciphertext read but not yet fed.
struct ReadSide<S> {
    sock: S,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// The order in which encrypted buffers reach the socket.
struct WriteOrder<S> {
    /// The ticket whose turn it is.
    turn: Mutex<u64>,
    moved: Condvar,
    /// The socket handle writers use (taken only by the ticket's holder).
    sock: Mutex<S>,
}

/// A handshake still to run (deferred, [`client_deferred`]).
struct Pending {
    mode: Arc<Mode>,
    side: Side,
}

struct Inner<S> {
    /// The deferred handshake, taken by the first reader or writer.
    pending: Mutex<Option<Pending>>,
    /// Set once no handshake is pending (the fast path of every read and write).
    ready: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    read: Mutex<ReadSide<S>>,
    write: WriteOrder<S>,
    /// Encryption buffers written out, for reuse.
    spare: Mutex<Vec<Vec<u8>>>,
    /// For shutdown and timeouts (never held across a blocking call).
    control: Mutex<S>,
    peer: String,
    mode: &'static str,
}

/// A TLS connection over a [`Transport`], itself a [`Transport`]: clones share one TLS
/// session, so one thread can write while another reads (see the [module docs](self)).
pub struct TlsStream<S> {
    inner: Arc<Inner<S>>,
}

impl<S> fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsStream({} with {})", self.inner.mode, self.inner.peer)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    dirtylog::sync::lock(m)
}

impl<S: Transport> TlsStream<S> {
    fn new(
        conn: Connection,
        sock: S,
        peer: String,
        tls: &TlsConfig,
        deferred: Option<Side>,
    ) -> Result<Self, TlsError> {
        let mode = tls.describe();
        let clone = |s: &S| {
            s.try_clone().map_err(|e| TlsError::Handshake {
                peer: peer.clone(),
                why: format!("cloning the socket: {e}"),
            })
        };
        let reader = clone(&sock)?;
        let writer = clone(&sock)?;
        let mut conn = conn;
        // Plaintext is encrypted and taken out at once (`write`): no limit needed.
        conn.set_buffer_limit(None);
        Ok(TlsStream {
            inner: Arc::new(Inner {
                pending: Mutex::new(deferred.map(|side| Pending {
                    mode: tls.mode.clone(),
                    side,
                })),
                ready: std::sync::atomic::AtomicBool::new(deferred.is_none()),
                state: Mutex::new(State {
                    conn,
                    next_ticket: 0,
                    failed: None,
                }),
                read: Mutex::new(ReadSide {
                    sock: reader,
                    buf: vec![0; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                }),
                write: WriteOrder {
                    turn: Mutex::new(0),
                    moved: Condvar::new(),
                    sock: Mutex::new(writer),
                },
                spare: Mutex::new(Vec::new()),
                control: Mutex::new(sock),
                peer,
                mode,
            }),
        })
    }

    /// The negotiated cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub fn cipher_suite(&self) -> Option<String> {
        lock(&self.inner.state)
            .conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
    }

    /// The peer's certificate chain (mutual TLS), its own certificate first.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        lock(&self.inner.state)
            .conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
    }

    /// Run the deferred handshake if there is one (the first caller runs it; the others wait
    /// for it), or fail as it failed.
    fn ensure_ready(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.inner.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut pending = lock(&self.inner.pending);
        let mut st = lock(&self.inner.state);
        if let Some(p) = pending.take() {
            // Nobody else holds the state or the socket: every other reader and writer
            // waits above for this handshake.
            let mut sock = lock(&self.inner.write.sock);
            let r = handshake(&mut st.conn, &mut *sock, &p.mode, p.side, &self.inner.peer);
            match r {
                Ok(()) => {
                    self.inner.ready.store(true, Ordering::Release);
                    return Ok(());
                }
                Err(e) => st.failed = Some(e.to_string()),
            }
        }
        let why = st
            .failed
            .clone()
            .unwrap_or_else(|| "TLS handshake not run".into());
        Err(io::Error::new(io::ErrorKind::PermissionDenied, why))
    }

    /// Take whatever rustls has to send, with a ticket; the caller holds the state lock.
    fn take_output(&self, state: &mut State) -> io::Result<Option<(u64, Vec<u8>)>> {
        if !state.conn.wants_write() {
            return Ok(None);
        }
        // A buffer of an earlier write: no fresh pages to fault in for every write.
        let mut out = lock(&self.inner.spare).pop().unwrap_or_default();
        out.clear();
        while state.conn.wants_write() {
            state.conn.write_tls(&mut out)?;
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        Ok(Some((ticket, out)))
    }

    /// Write `bytes` when `ticket`'s turn comes; the turn passes on whatever happens.
    fn send_in_order(&self, ticket: u64, bytes: &[u8]) -> io::Result<()> {
        let order = &self.inner.write;
        let mut turn = lock(&order.turn);
        while *turn != ticket {
            turn = order
                .moved
                .wait(turn)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(turn);
        struct Next<'a>(&'a Mutex<u64>, &'a Condvar);
        impl Drop for Next<'_> {
            fn drop(&mut self) {
                *lock(self.0) += 1;
                self.1.notify_all();
            }
        }
        let _next = Next(&order.turn, &order.moved);
        lock(&order.sock).write_all(bytes)
    }

    fn flush_output(&self, out: Option<(u64, Vec<u8>)>) -> io::Result<()> {
        match out {
            Some((ticket, bytes)) => {
                let r = self.send_in_order(ticket, &bytes);
                let mut spare = lock(&self.inner.spare);
                if spare.len() < SPARE_BUFFERS {
                    spare.push(bytes);
                }
                r
            }
            None => Ok(()),
        }
    }
}

fn tls_read_error(e: &rustls::Error, peer: &str) -> String {
    format!("TLS with {peer}: {e}")
}

impl<S: Transport> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.ensure_ready()?;
        let mut rs = lock(&self.inner.read);
        let rs = &mut *rs;
        loop {
            let mut filled = 0;
            let mut out = None;
            let mut result = None;
            {
                let mut st = lock(&self.inner.state);
                if let Some(e) = &st.failed {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.clone()));
                }
                loop {
                    match st.conn.reader().read(&mut buf[filled..]) {
                        Ok(0) => {
                            // close_notify: the peer ended cleanly.
                            if filled == 0 {
                                result = Some(Ok(0));
                            }
                            break;
                        }
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break;
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            if filled == 0 {
                                result = Some(Err(e));
                            }
                            break;
                        }
                    }
                    if rs.start == rs.end {
                        break;
                    }
                    // Feed buffered ciphertext and decrypt.
                    let mut pending = &rs.buf[rs.start..rs.end];
                    let fed = match st.conn.read_tls(&mut pending) {
                        Ok(n) => n,
                        Err(e) => {
                            result = Some(Err(e));
                            break;
                        }
                    };
                    rs.start += fed;
                    if let Err(e) = st.conn.process_new_packets() {
                        let msg = tls_read_error(&e, &self.inner.peer);
                        st.failed = Some(msg.clone());
                        // The alert for the peer, if any.
                        out = self.take_output(&mut st).ok().flatten();
                        result = Some(Err(io::Error::new(io::ErrorKind::InvalidData, msg)));
                        break;
                    }
                    match self.take_output(&mut st) {
                        Ok(Some(o)) => {
                            out = Some(o);
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            result = Some(Err(e));
                            break;
                        }
                    }
                }
            }
            // Anything rustls had to say (an alert, a key update) goes out in order.
            if let Err(e) = self.flush_output(out) {
                if filled == 0 && result.is_none() {
                    result = Some(Err(e));
                }
            }
            if filled > 0 {
                return Ok(filled);
            }
            if let Some(r) = result {
                return r;
            }
            if rs.start < rs.end {
                continue;
            }
            // Nothing decrypted and nothing pending: wait for the socket, without the state
            // lock (a writer may go on meanwhile).
            let n = match rs.sock.read(&mut rs.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                // End of file: rustls says whether it was clean (close_notify) or not.
                let mut st = lock(&self.inner.state);
                let _ = st.conn.read_tls(&mut &[][..]);
                return match st.conn.process_new_packets() {
                    Ok(_) => match st.conn.reader().read(buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed",
                        )),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        tls_read_error(&e, &self.inner.peer),
                    )),
                };
            }
            rs.start = 0;
            rs.end = n;
        }
    }
}

impl<S: Transport> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.ensure_ready()?;
        let chunk = &buf[..buf.len().min(WRITE_CHUNK)];
        let (n, out) = {
            let mut st = lock(&self.inner.state);
            if let Some(e) = &st.failed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.clone()));
            }
            let n = st.conn.writer().write(chunk)?;
            (n, self.take_output(&mut st)?)
        };
        self.flush_output(out)?;
        Ok(n)
    }

    /// The slices (up to `WRITE_CHUNK` (256 KiB) bytes of them) encrypted as one run of records and
    /// written with one socket write: a frame's head, data and CRC do not become three records
    /// and three system calls.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.ensure_ready()?;
        let mut take = Vec::with_capacity(bufs.len());
        let mut room = WRITE_CHUNK;
        for b in bufs {
            if room == 0 {
                break;
            }
            let k = b.len().min(room);
            if k > 0 {
                take.push(io::IoSlice::new(&b[..k]));
                room -= k;
            }
        }
        if take.is_empty() {
            return Ok(0);
        }
        let (n, out) = {
            let mut st = lock(&self.inner.state);
            if let Some(e) = &st.failed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.clone()));
            }
            let n = st.conn.writer().write_vectored(&take)?;
            (n, self.take_output(&mut st)?)
        };
        self.flush_output(out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write is on the socket when it returns.
        Ok(())
    }
}

impl<S: Transport> Transport for TlsStream<S> {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(TlsStream {
            inner: self.inner.clone(),
        })
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        lock(&self.inner.control).shutdown(how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        lock(&self.inner.control).set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        lock(&self.inner.control).set_write_timeout(timeout)
    }
    fn prepare(&self) -> io::Result<()> {
        lock(&self.inner.control).prepare()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn psk_pair(
        a: &[u8],
        b: &[u8],
    ) -> (
        Result<TlsStream<UnixStream>, TlsError>,
        Result<TlsStream<UnixStream>, TlsError>,
    ) {
        let (x, y) = UnixStream::pair().unwrap();
        let (ta, tb) = (TlsConfig::psk(a).unwrap(), TlsConfig::psk(b).unwrap());
        std::thread::scope(|s| {
            let srv = s.spawn(|| server(y, &tb, Duration::from_secs(5), "sender"));
            let cli = client(x, &ta, "ignored", Duration::from_secs(5), "receiver");
            (cli, srv.join().unwrap())
        })
    }

    #[test]
    fn short_psk_refused() {
        let e = TlsConfig::psk(&[7; 31]).unwrap_err();
        assert!(e.to_string().contains("31 bytes, fewer than 32"), "{e}");
    }

    #[test]
    fn psk_proofs_and_concurrent_io() {
        let (c, s) = psk_pair(&[1; 32], &[1; 32]);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert_eq!(
            c.cipher_suite().as_deref(),
            Some("TLS13_AES_128_GCM_SHA256")
        );
        // One thread writes 8 MiB each way while another reads: clones share the session.
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| ((i * 31) >> 3) as u8).collect();
        std::thread::scope(|sc| {
            let mut c2 = c.try_clone().unwrap();
            let mut s2 = s.try_clone().unwrap();
            let d = &data;
            sc.spawn(move || c2.write_all(d).unwrap());
            sc.spawn(move || s2.write_all(d).unwrap());
            let r1 = sc.spawn(|| {
                let mut got = vec![0; d.len()];
                s.read_exact(&mut got).unwrap();
                got
            });
            let mut got = vec![0; d.len()];
            c.read_exact(&mut got).unwrap();
            assert!(got == *d);
            assert!(r1.join().unwrap() == *d);
        });
    }

    #[test]
    fn wrong_psk_refused_both_sides() {
        let (c, s) = psk_pair(&[1; 32], &[2; 32]);
        let c = c.unwrap_err().to_string();
        let s = s.unwrap_err().to_string();
        assert!(c.contains("refused our pre-shared-key proof"), "{c}");
        assert!(s.contains("sender's pre-shared-key proof is wrong"), "{s}");
    }

    #[test]
    fn shutdown_unblocks_a_reader() {
        let (c, s) = psk_pair(&[3; 40], &[3; 40]);
        let (c, _s) = (c.unwrap(), s.unwrap());
        let mut reader = c.try_clone().unwrap();
        let t = std::thread::spawn(move || reader.read(&mut [0; 10]));
        std::thread::sleep(Duration::from_millis(50));
        c.shutdown(Shutdown::Both).unwrap();
        assert!(!matches!(t.join().unwrap(), Ok(n) if n > 0));
    }

    #[test]
    fn shutdown_unblocks_writers() {
        let (c, s) = psk_pair(&[4; 32], &[4; 32]);
        // Nobody reads the other end: the writers fill the socket and block (one in the
        // socket, the others waiting for their turn) until the shutdown.
        let (c, _s) = (c.unwrap(), s.unwrap());
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let mut w = c.try_clone().unwrap();
                std::thread::spawn(move || {
                    let block = vec![7u8; 1 << 20];
                    loop {
                        if let Err(e) = w.write_all(&block) {
                            return e;
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        c.shutdown(Shutdown::Both).unwrap();
        for w in writers {
            let e = w.join().unwrap();
            assert_ne!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        }
    }
}
