//! The TLS options of `migrate send`, `migrate receive` and `demo` (mutual TLS from PEM
//! files, or a pre-shared key), and the rule that plain TCP stays on this host unless
//! `--insecure` says otherwise. See docs/SECURITY.md.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;
use dirtylog_migrate::transport::tls::{self, TlsConfig};
use dirtylog_migrate::{
    send, send_on, Address, MigrateError, MigrationSource, Progress, SendConfig, SendReport,
};

/// Authentication and encryption of the migration's connections (both sides).
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Mutual TLS: this side's certificate (PEM; the certificate, then any intermediates).
    /// Needs --tls-key and --tls-ca; the other side needs the same three options.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: this side's private key (PEM: PKCS#8, RSA or EC).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA certificate(s) (PEM) that must have signed the other side's
    /// certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// TLS with a pre-shared key instead of certificates: a file of at least 32 random bytes
    /// (`head -c 32 /dev/urandom > FILE`), the same on both sides. Each connection proves
    /// knowledge of the key bound to its own TLS session.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub psk_file: Option<PathBuf>,
    /// Allow plain TCP on or to a non-loopback address (no authentication, no encryption:
    /// anyone who reaches the receiver can run code on its host). Prints a warning.
    #[arg(long)]
    pub insecure: bool,
}

/// [`TlsArgs`] and what only the sender needs.
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct SendTlsArgs {
    #[command(flatten)]
    pub common: TlsArgs,
    /// Mutual TLS: the name (DNS or IP) the receiver's certificate must be for. Default: the
    /// host part of --to.
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The TLS settings, or `None` for plain connections; unreadable or unusable files are
    /// refused here, before any work.
    pub fn config(&self) -> Result<Option<TlsConfig>, String> {
        let config = match (&self.tls_cert, &self.tls_key, &self.tls_ca, &self.psk_file) {
            (Some(cert), Some(key), Some(ca), None) => {
                TlsConfig::mutual_from_pem_files(cert, key, ca).map(Some)
            }
            (None, None, None, Some(psk)) => TlsConfig::psk_from_file(psk).map(Some),
            (None, None, None, None) => Ok(None),
            _ => {
                return Err(
                    "mutual TLS needs all of --tls-cert, --tls-key and --tls-ca; \
                            --psk-file goes alone"
                        .into(),
                )
            }
        };
        let config = config.map_err(|e| e.to_string())?;
        if config.is_some() && self.insecure {
            return Err("--insecure allows plain TCP; it has no effect with TLS: drop it".into());
        }
        Ok(config)
    }

    /// Plain TCP stays on this host: `addr` (given as `flag`) must be a loopback address or
    /// a Unix socket unless TLS is on or `--insecure` is given (then with a warning).
    pub fn check_plain(&self, addr: &Address, flag: &str, tls: bool) -> Result<(), String> {
        if tls || tls::is_local(addr) {
            return Ok(());
        }
        if self.insecure {
            eprintln!(
                "warning: --insecure: plain TCP on {flag} {addr}, not a loopback address: no \
                 authentication and no encryption; anyone who can reach it can read the guest's \
                 memory or run their own code on the receiving host (docs/SECURITY.md)"
            );
            return Ok(());
        }
        Err(format!(
            "refusing plain TCP on {flag} {addr}: it is not a loopback address, and without TLS \
             anyone who can reach the receiver can run their own code on its host. Use mutual \
             TLS (--tls-cert, --tls-key, --tls-ca) or --psk-file on both sides \
             (docs/SECURITY.md), or --insecure on a network you trust completely"
        ))
    }

    /// The same options for a child `dirtylog migrate receive`.
    pub fn child_args(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        let mut push = |flag: &str, v: &Option<PathBuf>| {
            if let Some(p) = v {
                out.push(flag.into());
                out.push(p.clone().into_os_string());
            }
        };
        push("--tls-cert", &self.tls_cert);
        push("--tls-key", &self.tls_key);
        push("--tls-ca", &self.tls_ca);
        push("--psk-file", &self.psk_file);
        if self.insecure {
            out.push("--insecure".into());
        }
        out
    }
}

/// How `migrate send` connects: plain, or TLS with the name the receiver must prove.
#[derive(Debug, Clone)]
pub struct Client {
    tls: Option<(TlsConfig, String)>,
}

impl SendTlsArgs {
    /// Default --tls-server-name to the host part of the --to text (`HOST:PORT`, `[V6]:PORT`).
    pub fn default_server_name(&mut self, to: &str) {
        if self.tls_server_name.is_some() || to.starts_with("unix:") {
            return;
        }
        if let Some((host, _port)) = to.rsplit_once(':') {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if !host.is_empty() {
                self.tls_server_name = Some(host.to_string());
            }
        }
    }

    /// Refuse TLS options where they cannot take effect (`what` says where).
    pub fn refuse(&self, what: &str) -> Result<(), String> {
        let c = &self.common;
        let given = c.tls_cert.is_some()
            || c.tls_key.is_some()
            || c.tls_ca.is_some()
            || c.psk_file.is_some()
            || c.insecure
            || self.tls_server_name.is_some();
        if given {
            return Err(format!(
                "--tls-cert, --tls-key, --tls-ca, --tls-server-name, --psk-file and --insecure \
                 have no effect with {what}: drop them"
            ));
        }
        Ok(())
    }

    /// Check the options against `to` and load the TLS settings: before any work.
    pub fn client(&self, to: &Address) -> Result<Client, String> {
        let config = self.common.config()?;
        self.common.check_plain(to, "--to", config.is_some())?;
        let name = match (&self.tls_server_name, to) {
            (Some(n), _) => n.clone(),
            (None, Address::Tcp(a)) => a.ip().to_string(),
            (None, Address::Unix(_)) => "localhost".to_string(),
        };
        Ok(Client {
            tls: config.map(|c| (c, name)),
        })
    }
}

impl Client {
    /// `plain`, `mutual TLS` or `TLS with a pre-shared key`, for the summary lines.
    pub fn describe(&self) -> &'static str {
        self.tls.as_ref().map_or("plain", |(c, _)| c.describe())
    }

    /// Connect (plain or TLS) and migrate `src` to `to`.
    pub fn send<S: MigrationSource>(
        &self,
        src: &S,
        to: &Address,
        config: &SendConfig,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<SendReport, MigrateError> {
        match &self.tls {
            None => send(src, to.clone(), config, progress),
            Some((tls, name)) => {
                let streams = tls::connect(
                    to,
                    config.connections,
                    config.connect_timeout.max(Duration::from_millis(1)),
                    config.io_timeout,
                    tls,
                    name,
                )?;
                send_on(src, streams, config, progress)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_defaults_to_the_host_of_to() {
        let mut a = SendTlsArgs::default();
        a.default_server_name("dst.example:4444");
        assert_eq!(a.tls_server_name.as_deref(), Some("dst.example"));
        let mut a = SendTlsArgs::default();
        a.default_server_name("[::1]:4444");
        assert_eq!(a.tls_server_name.as_deref(), Some("::1"));
        let mut a = SendTlsArgs::default();
        a.default_server_name("unix:/x");
        assert_eq!(a.tls_server_name, None);
    }

    #[test]
    fn plain_tcp_only_on_loopback_unless_insecure() {
        let a = TlsArgs::default();
        let lan: Address = "192.0.2.1:4444".parse().unwrap();
        let e = a.check_plain(&lan, "--listen", false).unwrap_err();
        assert!(e.contains("--psk-file") && e.contains("--insecure"), "{e}");
        assert!(a.check_plain(&lan, "--listen", true).is_ok());
        assert!(a
            .check_plain(&"127.0.0.1:1".parse().unwrap(), "--to", false)
            .is_ok());
        let insecure = TlsArgs {
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(insecure.check_plain(&lan, "--to", false).is_ok());
    }
}
