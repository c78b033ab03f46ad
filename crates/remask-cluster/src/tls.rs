//! TLS from PEM files. Clients reach the coordinator over TLS; coordinator
//! and workers use mutual TLS: each worker requires a client certificate
//! signed by the cluster CA, and the coordinator presents its own and checks
//! the worker's against the same CA.
//!
//! Servers reload their certificate and key when the files change (a
//! renewal by cert-manager, certbot or a Kubernetes secret update): a
//! thread polls both files' modification time and size every
//! [`RELOAD_INTERVAL`] and swaps the pair that new handshakes get
//! ([`ReloadingCert`], rustls' `ResolvesServerCert`); connections already
//! open keep theirs. A new pair that does not load (half written, a key that
//! does not go with the certificate, not PEM) is logged as a warning and the
//! old pair stays in use until the files change again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// `--tls-cert`, `--tls-key`, `--tls-ca`.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    Incomplete,
    #[error("mutual TLS needs --tls-cert, --tls-key and --tls-ca")]
    MutualIncomplete,
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    pub fn is_enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        self.check()?;
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(read(c)?, read(k)?))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Incomplete),
        }
    }

    fn ca(&self) -> Result<Option<Certificate>, TlsError> {
        self.ca
            .as_deref()
            .map(|p| {
                roots(p)?;
                Ok(Certificate::from_pem(read(p)?))
            })
            .transpose()
    }

    /// The coordinator's public server: TLS when a certificate is given;
    /// clients authenticate with API keys, not certificates. `alpn`: the
    /// protocols offered (`h2` for gRPC; `h2`, `http/1.1` for HTTP).
    pub fn public_server(&self, alpn: &[&[u8]]) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some(server_config(cert, key, None, alpn, true)?)),
            (None, None) => Ok(None),
            _ => Err(TlsError::Incomplete),
        }
    }

    /// A worker's server: mutual TLS, a client certificate signed by the CA
    /// is required.
    pub fn worker_server(&self) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        if !self.is_enabled() {
            return Ok(None);
        }
        match (&self.cert, &self.key, &self.ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(server_config(cert, key, Some(ca), &[b"h2"], true)?))
            }
            _ => Err(TlsError::MutualIncomplete),
        }
    }

    /// Parses every PEM file given, so that a corrupt one is reported when
    /// the process starts, not at the first connection.
    pub fn check(&self) -> Result<(), TlsError> {
        match (&self.cert, &self.key) {
            // The pair is checked as a server would use it (the key matches
            // the certificate, which is valid X.509).
            (Some(cert), Some(key)) => drop(server_config(cert, key, None, &[], false)?),
            (Some(cert), None) => drop(certificates(cert)?),
            (None, Some(key)) => drop(private_key(key)?),
            (None, None) => {}
        }
        if let Some(ca) = &self.ca {
            roots(ca)?;
        }
        Ok(())
    }

    /// How the coordinator dials workers: trusts the CA, presents its own
    /// certificate.
    pub fn worker_client(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        if !self.is_enabled() {
            return Ok(None);
        }
        match (self.identity()?, self.ca()?) {
            (Some(id), Some(ca)) => {
                Ok(Some(ClientTlsConfig::new().ca_certificate(ca).identity(id)))
            }
            _ => Err(TlsError::MutualIncomplete),
        }
    }

    /// A client of the coordinator (`remask generate --endpoint`): trusts the CA.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let mut config = match self.ca()? {
            Some(ca) => ClientTlsConfig::new().ca_certificate(ca),
            None if self.is_enabled() => ClientTlsConfig::new(),
            None => return Ok(None),
        };
        if let Some(id) = self.identity()? {
            config = config.identity(id);
        }
        Ok(Some(config))
    }
}

/// The certificates of a PEM file: at least one, each well formed.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let invalid = |reason: String| TlsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a valid PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "no certificate in it (expected a PEM `-----BEGIN CERTIFICATE-----` block)".into(),
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        path: path.to_path_buf(),
        reason: format!("not a valid PEM private key: {e}"),
    })
}

/// The CA certificates of a PEM file as trust anchors (each valid X.509).
fn roots(ca: &Path) -> Result<tokio_rustls::rustls::RootCertStore, TlsError> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for (i, c) in certificates(ca)?.into_iter().enumerate() {
        roots.add(c).map_err(|e| TlsError::Invalid {
            path: ca.to_path_buf(),
            reason: format!("certificate {} is not a usable CA certificate: {e}", i + 1),
        })?;
    }
    Ok(roots)
}

/// How often a server checks its certificate and key files for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// The certificate and key a server presents, reloaded when their files
/// change (see the module's documentation).
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

/// What tells that a file changed: its modification time and size (of the
/// file a symlink points to, as Kubernetes secret volumes swap them).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl ReloadingCert {
    /// Loads the pair (an error when it does not load).
    fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let current = certified_key(cert, key, &provider)?;
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(current)),
        })
    }

    /// The pair new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads the files again: the new pair, or the error (the old pair stays).
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = certified_key(&self.cert, &self.key, &self.provider)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    /// Polls the files every [`RELOAD_INTERVAL`] on a thread of its own, for
    /// as long as a server configuration holds `this`.
    fn watch(this: &Arc<Self>) {
        let weak = Arc::downgrade(this);
        let mut last = (stamp(&this.cert), stamp(&this.key));
        let spawned = std::thread::Builder::new()
            .name("tls-reload".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(RELOAD_INTERVAL);
                    let Some(this) = weak.upgrade() else { return };
                    let now = (stamp(&this.cert), stamp(&this.key));
                    // Gone files (mid-rename) are waited for; an unchanged pair is kept.
                    if now == last || now.0.is_none() || now.1.is_none() {
                        continue;
                    }
                    last = now;
                    match this.reload() {
                        Ok(()) => tracing::info!(
                            cert = %this.cert.display(),
                            key = %this.key.display(),
                            "TLS certificate reloaded: new connections get the new one"
                        ),
                        Err(e) => tracing::warn!(
                            cert = %this.cert.display(),
                            key = %this.key.display(),
                            "TLS certificate files changed but do not load ({e}); still serving the previous certificate"
                        ),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "cannot start the TLS reload thread ({e}): certificates are not reloaded"
            );
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The certificate chain and private key of two PEM files, checked to go
/// together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs = certificates(cert)?;
    let key_der = private_key(key)?;
    CertifiedKey::from_der(certs, key_der, provider).map_err(|e| TlsError::Invalid {
        path: key.to_path_buf(),
        reason: format!("does not go with the certificate {}: {e}", cert.display()),
    })
}

/// A rustls server configuration; with `client_ca`, clients must present a
/// certificate that CA signed. With `watch`, the certificate and key are
/// reloaded when their files change.
fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
    watch: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    use tokio_rustls::rustls;
    let invalid = |path: &Path, reason: String| TlsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(ReloadingCert::load(cert, key, provider.clone())?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(cert, e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider,
            )
            .build()
            .map_err(|e| invalid(ca, format!("not a usable CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    if watch {
        ReloadingCert::watch(&resolver);
    }
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
