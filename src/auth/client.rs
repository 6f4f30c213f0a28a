//! The HTTP(S) client of the authentication backends that call out: the HTTP service
//! (`[auth.http]`) and the JWKS (`auth.jwt.jwks_url`). Both are hyper-util's pooled client
//! over hyper-rustls, built here one way, so the trust anchors (a CA file, else the system's
//! store, and none at all for plain `http://`), the TLS versions and the connect timeout
//! cannot drift apart between them.

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A pooled HTTP/1 client for `http://` and `https://` URLs with bodies held in memory.
pub type Client = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA file cannot be read or holds no certificate.
    #[error("{0}")]
    CaFile(#[from] crate::tls::TlsError),
    /// `https://` without a CA file, and the system's store has no usable certificate.
    #[error("no CA certificates found in the system's store for https:// ({0})")]
    NoRoots(std::io::Error),
}

/// How the client connects and keeps connections.
pub struct Settings<'a> {
    /// Trust only this file's certificates (PEM); `None`: the system's store.
    pub ca_file: Option<&'a Path>,
    /// Whether any URL the client will be given is `https://`: without a CA file the system's
    /// store is then read, and must hold a certificate. Plain `http://` alone needs none.
    pub https: bool,
    /// Longest a TCP connect takes.
    pub connect_timeout: Duration,
    /// How long an idle connection stays in the pool.
    pub pool_idle: Duration,
    /// Most idle connections kept per host.
    pub pool_max_idle: usize,
}

/// Builds the client (reads the CA file, or the system's store for `https://`).
pub fn build(s: &Settings<'_>) -> Result<Client, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = hyper_rustls::HttpsConnectorBuilder::new();
    let tls = match (s.ca_file, s.https) {
        (Some(ca), _) => {
            tls.with_tls_config(Arc::unwrap_or_clone(crate::tls::client_config(ca, None)?))
        }
        (None, true) => tls
            .with_provider_and_native_roots(provider)
            .map_err(ClientError::NoRoots)?,
        // Plain http:// only: TLS is never used, so no roots are needed.
        (None, false) => tls.with_tls_config(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| crate::tls::TlsError::Config(e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(s.connect_timeout));
    let connector = tls.https_or_http().enable_http1().wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(s.pool_idle)
            .pool_max_idle_per_host(s.pool_max_idle)
            .build(connector),
    )
}

/// An error with its causes (hyper-util's says only "client error (Connect)" at the top).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
