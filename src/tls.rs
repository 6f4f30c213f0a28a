//! TLS for the `[listeners.tls]` listener: rustls server configuration from PEM files, optional
//! client certificates, reload without a restart, and the client certificate's Common Name for
//! `use_identity_as_username`.
//!
//! The handshake itself runs in each connection's own task (with the connect timeout), never
//! in the accept loop, so a slow or hostile handshake holds up nobody else.
//!
//! Apart from the server side, [`client_config`] builds the configuration of an outgoing
//! connection (a bridge to another broker, `src/bridge/link.rs`) from the same PEM files.

use crate::config::TlsListenerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Builds the rustls configuration from the listener's files (TLS 1.2 and 1.3).
pub fn server_config(cfg: &TlsListenerConfig) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(server_config_and_expiry(cfg)?.0)
}

/// The notAfter time, in Unix seconds, of a chain's first (the leaf) certificate; None when
/// it cannot be parsed (rustls accepted it, so that would be an odd certificate indeed).
pub fn not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// [`server_config`], with the leaf certificate's notAfter read from the same bytes (so the
/// expiry reported is the certificate served, even when the file changes meanwhile).
fn server_config_and_expiry(
    cfg: &TlsListenerConfig,
) -> Result<(Arc<ServerConfig>, Option<i64>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&cfg.cert)?;
    let expiry = not_after(&chain);
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| file_err(&cfg.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| file_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if cfg.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| file_err(&cfg.cert, e))?;
    Ok((Arc::new(config), expiry))
}

/// The configuration of an outgoing TLS connection (a bridge): the remote's certificate is
/// checked against the CAs in `ca` (not the system's roots: a bridge trusts whom it is told
/// to), and `identity` (certificate chain, key) is presented when the remote asks for one.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| file_err(cert, e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The Common Name of a verified client certificate.
pub fn peer_common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The listener's current TLS configuration, replaced when the files change.
pub struct TlsReloader {
    /// The files in use; a configuration reload may point at other ones.
    cfg: RwLock<TlsListenerConfig>,
    current: RwLock<TlsAcceptor>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
    /// The served certificate's notAfter (`tern_tls_certificate_expiry_timestamp_seconds`),
    /// set whenever a certificate is installed, so an alert sees a renewal take effect.
    expiry: prometheus::IntGauge,
}

/// A listener's TLS configuration read from its files, not yet in use.
pub struct PreparedTls {
    acceptor: TlsAcceptor,
    /// The leaf certificate's notAfter, Unix seconds.
    not_after: Option<i64>,
}

impl TlsReloader {
    /// `expiry` is set to the certificate's notAfter now and after every reload.
    pub fn new(
        cfg: TlsListenerConfig,
        expiry: prometheus::IntGauge,
    ) -> Result<TlsReloader, TlsError> {
        let prepared = Self::prepare(&cfg)?;
        let stamps = Self::stamps_of(&cfg);
        expiry.set(prepared.not_after.unwrap_or(0));
        Ok(TlsReloader {
            cfg: RwLock::new(cfg),
            current: RwLock::new(prepared.acceptor),
            stamps: Mutex::new(stamps),
            expiry,
        })
    }

    fn stamps_of(cfg: &TlsListenerConfig) -> Vec<Option<SystemTime>> {
        let mut paths = vec![&cfg.cert, &cfg.key];
        paths.extend(cfg.client_ca.iter());
        paths
            .into_iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    pub fn settings(&self) -> TlsListenerConfig {
        self.cfg
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The acceptor for a new connection (existing connections keep theirs).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads the certificate, key and CA. On error the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = self.settings();
        let prepared = Self::prepare(&cfg)?;
        self.install(cfg, prepared);
        Ok(())
    }

    /// Loads `cfg`'s certificate, key and CA without using them yet.
    pub fn prepare(cfg: &TlsListenerConfig) -> Result<PreparedTls, TlsError> {
        let (config, not_after) = server_config_and_expiry(cfg)?;
        Ok(PreparedTls {
            acceptor: TlsAcceptor::from(config),
            not_after,
        })
    }

    /// New connections use `prepared` (made from `cfg`) from now on; the watcher follows
    /// `cfg`'s files.
    pub fn install(&self, cfg: TlsListenerConfig, prepared: PreparedTls) {
        self.expiry.set(prepared.not_after.unwrap_or(0));
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = prepared.acceptor;
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) = Self::stamps_of(&cfg);
        *self.cfg.write().unwrap_or_else(PoisonError::into_inner) = cfg;
    }

    /// Reloads when a file's modification time changes (checked every two seconds).
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let cfg = self.settings();
            let now = Self::stamps_of(&cfg);
            let changed = *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) != now;
            if changed {
                match self.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %cfg.cert.display(), "TLS certificates reloaded")
                    }
                    Err(e) => {
                        // Keep serving with the old files; try again when they change again.
                        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) = now;
                        tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificates")
                    }
                }
            }
        }
    }
}
