//! TLS from PEM files. Clients reach the coordinator over TLS; coordinator
//! and workers use mutual TLS: each worker requires a client certificate
//! signed by the cluster CA, and the coordinator presents its own and checks
//! the worker's against the same CA.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(read(c)?, read(k)?))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Incomplete),
        }
    }

    fn ca(&self) -> Result<Option<Certificate>, TlsError> {
        self.ca
            .as_deref()
            .map(|p| Ok(Certificate::from_pem(read(p)?)))
            .transpose()
    }

    /// The coordinator's public server: TLS when a certificate is given;
    /// clients authenticate with API keys, not certificates.
    pub fn public_server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        Ok(self
            .identity()?
            .map(|id| ServerTlsConfig::new().identity(id)))
    }

    /// A worker's server: mutual TLS, a client certificate signed by the CA
    /// is required.
    pub fn worker_server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        if !self.is_enabled() {
            return Ok(None);
        }
        match (self.identity()?, self.ca()?) {
            (Some(id), Some(ca)) => {
                Ok(Some(ServerTlsConfig::new().identity(id).client_ca_root(ca)))
            }
            _ => Err(TlsError::MutualIncomplete),
        }
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

/// The HTTP API over TLS: an axum listener that completes the TLS handshake
/// of each accepted connection (with a time limit, so a stalled client cannot
/// hold the accept loop).
pub struct HttpsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl HttpsListener {
    pub fn new(tcp: tokio::net::TcpListener, files: &TlsFiles) -> Result<Self, TlsError> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
            return Err(TlsError::Incomplete);
        };
        let bad = |path: &Path, e: String| TlsError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(cert, e.to_string()))?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(|e| bad(cert, e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(HttpsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
        })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.tcp.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handshake = self.acceptor.accept(stream);
            match tokio::time::timeout(std::time::Duration::from_secs(5), handshake).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
