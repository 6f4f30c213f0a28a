//! TLS for the `[listeners.tls]` listener: rustls server configuration from PEM files, optional
//! client certificates, reload without a restart, and the client certificate's Common Name for
//! `use_identity_as_username`.
//!
//! With `crl_file`, client certificates are checked against certificate revocation lists
//! (rustls' webpki verifier): the end-entity certificate only, as Mosquitto's `crlfile`, and
//! fail closed (one whose issuer has no CRL in the file is refused). The CRL file is re-read
//! with the certificates: on SIGHUP and when any of the files changes.
//!
//! webpki accepts only X.509 v3 certificates (a v1 one has no basicConstraints to tell a CA
//! from a client). A v1 client certificate, as `openssl x509 -req` makes without `-extfile`
//! (Mosquitto's TLS guide), is refused with a log line saying so and how to re-issue it; a
//! v1 CA in `client_ca` still works as a trust anchor, and is a warning.
//!
//! The handshake itself runs in each connection's own task (with the connect timeout), never
//! in the accept loop, so a slow or hostile handshake holds up nobody else.
//!
//! Apart from the server side, [`client_config`] builds the configuration of an outgoing
//! connection (a bridge to another broker, `src/bridge/link.rs`) from the same PEM files.

use crate::config::TlsListenerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
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

/// Every PEM item of type `T` in `path` (at least one; `none` says what was expected).
fn pem_items<T: PemObject>(path: &Path, none: &str) -> Result<Vec<T>, TlsError> {
    let items = T::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if items.is_empty() {
        return Err(file_err(path, none));
    }
    Ok(items)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem_items(path, "no certificate found")
}

/// Builds the rustls configuration from the listener's files (TLS 1.2 and 1.3).
pub fn server_config(cfg: &TlsListenerConfig) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(load(cfg)?.config)
}

/// The notAfter time, in Unix seconds, of a chain's first (the leaf) certificate; None when
/// it cannot be parsed (rustls accepted it, so that would be an odd certificate indeed).
pub fn not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// How to re-issue a client certificate as X.509 v3 (the extensions file is what makes
/// `openssl x509 -req` write v3): said in the log when a v1 one is refused (certs/README.md
/// shows the same).
const REISSUE_CLIENT_V3: &str = "openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key \
     -CAcreateserial -out client.crt -days 365 -extfile <(printf \"basicConstraints=CA:FALSE\\n\
     keyUsage=digitalSignature\\nextendedKeyUsage=clientAuth\")";

/// The same for a server certificate (its extensions file also names the host).
const REISSUE_SERVER_V3: &str = "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key \
     -CAcreateserial -out server.crt -days 365 -extfile <(printf \"basicConstraints=CA:FALSE\\n\
     keyUsage=digitalSignature,keyEncipherment\\nextendedKeyUsage=serverAuth\\n\
     subjectAltName=DNS:broker.example.com\")";

/// The subject of `cert` when it is an X.509 v1 certificate (one without extensions, as
/// `openssl x509 -req` makes without `-extfile`); None for v2/v3 or what does not parse.
fn v1_subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    (parsed.version() == x509_parser::x509::X509Version::V1).then(|| parsed.subject().to_string())
}

/// A listener's files, read and checked: the rustls configuration, the served certificate's
/// notAfter, and what is wrong in them without stopping the listener (for `tern check` on
/// stderr, and the log when they are installed).
struct Loaded {
    config: Arc<ServerConfig>,
    not_after: Option<i64>,
    warnings: Vec<String>,
}

/// Reads the listener's files; the notAfter is read from the same bytes as the configuration,
/// so the expiry reported is the certificate served, even when the file changes meanwhile.
fn load(cfg: &TlsListenerConfig) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&cfg.cert)?;
    let mut warnings = Vec::new();
    // rustls refuses its own v1 certificate too, but with `UnsupportedCertVersion` only.
    if let Some(subject) = chain.first().and_then(v1_subject) {
        return Err(file_err(
            &cfg.cert,
            format!(
                "the certificate \"{subject}\" is X.509 v1, and rustls (webpki) accepts only \
                 v3: re-issue it with v3 extensions, e.g. {REISSUE_SERVER_V3}"
            ),
        ));
    }
    for subject in chain.iter().skip(1).filter_map(v1_subject) {
        warnings.push(format!(
            "{}: the chain's certificate \"{subject}\" is X.509 v1; clients that verify with \
             webpki (rustls) refuse it",
            cfg.cert.display()
        ));
    }
    let expiry = not_after(&chain);
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| file_err(&cfg.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let anchors = certs(ca)?;
            for subject in anchors.iter().filter_map(v1_subject) {
                warnings.push(format!(
                    "{}: the CA certificate \"{subject}\" is X.509 v1: it is accepted as a \
                     trust anchor, but client certificates must be v3 (webpki refuses v1 ones); \
                     a CA tool that made this one may make v1 client certificates too. Re-issue \
                     them with: {REISSUE_CLIENT_V3}",
                    ca.display()
                ));
            }
            let mut roots = RootCertStore::empty();
            for c in anchors.iter().cloned() {
                roots.add(c).map_err(|e| file_err(ca, e))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if let Some(path) = &cfg.crl_file {
                let crls = crls(path)?;
                warnings.extend(crl_warnings(path, &crls, &anchors));
                // The client certificate itself is checked (as Mosquitto's `crlfile` does);
                // a client certificate whose issuer has no CRL in the file is refused
                // (status unknown), so a CRL left out fails closed.
                verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
            }
            if !cfg.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let inner = verifier.build().map_err(|e| match (&e, &cfg.crl_file) {
                (VerifierBuilderError::InvalidCrl(_), Some(path)) => file_err(path, e),
                _ => TlsError::Config(e.to_string()),
            })?;
            builder.with_client_cert_verifier(Arc::new(ClientVerifier { inner }))
        }
        None if cfg.crl_file.is_some() => {
            return Err(TlsError::Config(
                "crl_file needs client_ca: the CRLs are checked against client certificates, \
                 which are asked for only with client_ca"
                    .into(),
            ))
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| file_err(&cfg.cert, e))?;
    Ok(Loaded {
        config: Arc::new(config),
        not_after: expiry,
        warnings,
    })
}

/// The CRLs (PEM, `-----BEGIN X509 CRL-----`, one or more) in `path`.
fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    pem_items(
        path,
        "no CRL found (expected PEM: -----BEGIN X509 CRL-----)",
    )
}

/// What is odd about the CRLs without being an error: a CRL past its nextUpdate (still used:
/// refusing every client because a CRL was not refreshed in time would be an outage of its
/// own), and a CA in `client_ca` without a CRL (its client certificates are refused).
fn crl_warnings(
    path: &Path,
    crls: &[CertificateRevocationListDer<'_>],
    anchors: &[CertificateDer<'_>],
) -> Vec<String> {
    let now = x509_parser::time::ASN1Time::now();
    let mut issuers = Vec::new();
    let mut warnings = Vec::new();
    for crl in crls {
        // One that does not parse is refused by rustls with its own error.
        let Ok((_, parsed)) = x509_parser::parse_x509_crl(crl.as_ref()) else {
            continue;
        };
        issuers.push(parsed.issuer().as_raw().to_vec());
        if let Some(next) = parsed.next_update() {
            if next < now {
                warnings.push(format!(
                    "{}: the CRL of \"{}\" is past its nextUpdate ({next}); it is still used: \
                     publish a fresh one",
                    path.display(),
                    parsed.issuer()
                ));
            }
        }
    }
    for anchor in anchors {
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(anchor.as_ref()) else {
            continue;
        };
        if !issuers
            .iter()
            .any(|i| i.as_slice() == ca.subject().as_raw())
        {
            warnings.push(format!(
                "{}: no CRL of the client_ca certificate \"{}\": a client certificate it \
                 issued is refused (its revocation status is unknown)",
                path.display(),
                ca.subject()
            ));
        }
    }
    warnings
}

/// webpki's client certificate verification, which refuses an X.509 v1 certificate with only
/// `UnsupportedCertVersion` in the handshake's error; this one also logs a line that names
/// the certificate and how to re-issue it. It still refuses it: webpki supports only v3
/// (a v1 certificate has no extensions, so no basicConstraints to tell a CA from a client).
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

/// The log line for a refused chain holding an X.509 v1 certificate; None otherwise.
fn v1_refusal(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<String> {
    if let Some(subject) = v1_subject(end_entity) {
        return Some(format!(
            "client certificate refused: X.509 v1 client certificate \"{subject}\"; only v3 \
             certificates are accepted (webpki). Re-issue it as v3 by signing it with an \
             extensions file: {REISSUE_CLIENT_V3}"
        ));
    }
    let subject = intermediates.iter().find_map(v1_subject)?;
    Some(format!(
        "client certificate refused: its chain holds the X.509 v1 certificate \"{subject}\"; \
         only v3 certificates are accepted (webpki): re-issue that CA certificate with v3 \
         extensions (basicConstraints=critical,CA:TRUE, keyUsage=keyCertSign,cRLSign)"
    ))
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if verified.is_err() {
            if let Some(line) = v1_refusal(end_entity, intermediates) {
                tracing::warn!("{line}");
            }
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
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
    warnings: Vec<String>,
}

impl PreparedTls {
    /// What is wrong in the files without keeping the listener from serving (an X.509 v1
    /// certificate in `client_ca` or the chain, a CRL past its nextUpdate, a CA without a
    /// CRL): `tern check` prints them, installing them logs them.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!("TLS: {w}");
        }
    }
}

impl TlsReloader {
    /// `expiry` is set to the certificate's notAfter now and after every reload.
    pub fn new(
        cfg: TlsListenerConfig,
        expiry: prometheus::IntGauge,
    ) -> Result<TlsReloader, TlsError> {
        let prepared = Self::prepare(&cfg)?;
        prepared.log_warnings();
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
        paths.extend(cfg.crl_file.iter());
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

    /// Reloads the certificate, key, CA and CRLs. On error the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = self.settings();
        let prepared = Self::prepare(&cfg)?;
        self.install(cfg, prepared);
        Ok(())
    }

    /// Loads `cfg`'s certificate, key, CA and CRLs without using them yet.
    pub fn prepare(cfg: &TlsListenerConfig) -> Result<PreparedTls, TlsError> {
        let loaded = load(cfg)?;
        Ok(PreparedTls {
            acceptor: TlsAcceptor::from(loaded.config),
            not_after: loaded.not_after,
            warnings: loaded.warnings,
        })
    }

    /// New connections use `prepared` (made from `cfg`) from now on; the watcher follows
    /// `cfg`'s files.
    pub fn install(&self, cfg: TlsListenerConfig, prepared: PreparedTls) {
        prepared.log_warnings();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A CA (certs/gen.sh: CA, server certificate for localhost, client `device1`) in a
    /// temporary directory, with the files `openssl ca` needs to revoke and to write CRLs.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir =
                std::env::temp_dir().join(format!("tern-tls-unit-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let gen = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/gen.sh");
            let out = Command::new("bash")
                .arg(&gen)
                .arg(&dir)
                .output()
                .expect("run certs/gen.sh");
            assert!(out.status.success(), "{out:?}");
            std::fs::write(
                dir.join("ca.cnf"),
                "[ca]\ndefault_ca = tern\n[tern]\ndatabase = index.txt\n\
                 crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n",
            )
            .expect("ca.cnf");
            std::fs::write(dir.join("index.txt"), "").expect("index.txt");
            std::fs::write(dir.join("crlnumber"), "01\n").expect("crlnumber");
            Pki { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        fn openssl(&self, args: &[&str]) {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        }

        /// A client certificate `NAME.pem` / `NAME.key` signed by the CA: v3 (with the
        /// extensions file certs/gen.sh uses) or v1 (Mosquitto's guide: no `-extfile`).
        fn client(&self, name: &str, v3: bool) {
            self.client_of(name, "ca", v3)
        }

        /// The same, signed by the CA `CA.pem` / `CA.key`.
        fn client_of(&self, name: &str, ca: &str, v3: bool) {
            self.key_and_csr(name, name);
            self.sign(name, ca, v3);
        }

        /// A P-256 key `NAME.key` and a request `NAME.csr` for the subject `/CN=CN`.
        fn key_and_csr(&self, name: &str, cn: &str) {
            self.openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
        }

        /// `NAME.csr` signed by the CA `CA.pem` / `CA.key` into `NAME.pem`: v3 with a client
        /// certificate's extensions, or v1 (no `-extfile`).
        fn sign(&self, name: &str, ca: &str, v3: bool) {
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
            let mut args = vec![
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &pem,
            ];
            if v3 {
                std::fs::write(
                    self.path("client.ext"),
                    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
                     extendedKeyUsage=clientAuth\n",
                )
                .expect("client.ext");
                args.extend(["-extfile", "client.ext"]);
            }
            self.openssl(&args);
        }

        fn revoke(&self, pem: &str) {
            self.openssl(&[
                "ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem", "-revoke", pem,
            ]);
        }

        /// The CA's CRL (everything revoked so far) into `out`; `extra` e.g. sets nextUpdate.
        fn crl(&self, out: &str, extra: &[&str]) {
            let mut args = vec![
                "ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem", "-gencrl",
                "-out", out,
            ];
            args.extend(extra);
            self.openssl(&args);
        }

        fn listener(&self, crl_file: Option<&str>) -> TlsListenerConfig {
            TlsListenerConfig {
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                cert: self.path("server.pem"),
                key: self.path("server.key"),
                client_ca: Some(self.path("ca.pem")),
                require_client_cert: true,
                use_identity_as_username: false,
                crl_file: crl_file.map(|f| self.path(f)),
            }
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    use std::net::SocketAddr;

    /// A TLS handshake in memory with `client`'s certificate (`NAME.pem`, `NAME.key`); the
    /// server's outcome (with TLS 1.3 the client is done before the server has checked its
    /// certificate, so only the server's side tells).
    async fn handshake(acceptor: TlsAcceptor, pki: &Pki, client: &str) -> Result<(), String> {
        let config = client_config(
            &pki.path("ca.pem"),
            Some((
                &pki.path(&format!("{client}.pem")),
                &pki.path(&format!("{client}.key")),
            )),
        )
        .map_err(|e| e.to_string())?;
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let connector = tokio_rustls::TlsConnector::from(config);
        let (server, _client) = tokio::join!(acceptor.accept(s), connector.connect(name, c));
        server.map(|_| ()).map_err(|e| e.to_string())
    }

    fn acceptor(cfg: &TlsListenerConfig) -> TlsAcceptor {
        TlsReloader::prepare(cfg).expect("prepare").acceptor
    }

    fn gauge() -> prometheus::IntGauge {
        prometheus::IntGauge::new("expiry", "test").expect("gauge")
    }

    #[tokio::test]
    async fn a_revoked_client_certificate_is_refused_and_the_others_accepted() {
        let pki = Pki::new("revoked");
        pki.client("other", true);
        pki.crl("crl.pem", &[]);
        let cfg = pki.listener(Some("crl.pem"));
        let before = acceptor(&cfg);
        assert_eq!(handshake(before.clone(), &pki, "client").await, Ok(()));
        assert_eq!(handshake(before.clone(), &pki, "other").await, Ok(()));

        pki.revoke("client.pem");
        pki.crl("crl.pem", &[]);
        let after = acceptor(&cfg);
        let refused = handshake(after.clone(), &pki, "client").await;
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("Revoked")),
            "{refused:?}"
        );
        assert_eq!(handshake(after, &pki, "other").await, Ok(()));
        // What was prepared before the CRL changed still accepts it (a reload replaces it).
        assert_eq!(handshake(before, &pki, "client").await, Ok(()));
    }

    #[tokio::test]
    async fn the_reloader_follows_the_crl_file_and_keeps_the_old_one_when_it_is_bad() {
        let pki = Pki::new("reload");
        pki.crl("crl.pem", &[]);
        let cfg = pki.listener(Some("crl.pem"));
        let reloader = TlsReloader::new(cfg.clone(), gauge()).expect("reloader");
        // The CRL is among the files watched.
        assert_eq!(TlsReloader::stamps_of(&cfg).len(), 4);
        assert!(TlsReloader::stamps_of(&cfg).iter().all(Option::is_some));
        assert_eq!(handshake(reloader.acceptor(), &pki, "client").await, Ok(()));

        pki.revoke("client.pem");
        pki.crl("crl.pem", &[]);
        reloader.reload().expect("reload");
        let refused = handshake(reloader.acceptor(), &pki, "client").await;
        assert!(refused.is_err_and(|e| e.contains("Revoked")));

        // A broken CRL file: the reload fails and the previous CRLs stay in force.
        std::fs::write(
            pki.path("crl.pem"),
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .expect("write");
        let err = reloader.reload().expect_err("a broken CRL is refused");
        assert!(err.to_string().contains("crl.pem"), "{err}");
        let refused = handshake(reloader.acceptor(), &pki, "client").await;
        assert!(refused.is_err_and(|e| e.contains("Revoked")));
        // A file without any CRL, or none at all, is refused the same way.
        std::fs::copy(pki.path("ca.pem"), pki.path("crl.pem")).expect("copy");
        let err = reloader.reload().expect_err("no CRL");
        assert!(err.to_string().contains("no CRL found"), "{err}");
        std::fs::remove_file(pki.path("crl.pem")).expect("remove");
        assert!(reloader.reload().is_err());
        assert!(handshake(reloader.acceptor(), &pki, "client")
            .await
            .is_err_and(|e| e.contains("Revoked")));
    }

    #[tokio::test]
    async fn several_crls_in_one_file_and_a_ca_without_one() {
        let pki = Pki::new("several");
        let other = Pki::new("several-other");
        // gen.sh's CAs share a name; CRLs are found by their issuer's name.
        other.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=Other CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        pki.revoke("client.pem");
        pki.crl("crl.pem", &[]);
        other.crl("crl.pem", &[]);
        // Only the other CA's CRL: the client's issuer has none, so its status is unknown
        // and it is refused (fail closed), and the warning says so.
        std::fs::copy(other.path("crl.pem"), pki.path("others.pem")).expect("copy");
        let cfg = pki.listener(Some("others.pem"));
        let prepared = TlsReloader::prepare(&cfg).expect("prepare");
        assert!(
            prepared.warnings().iter().any(|w| w.contains("no CRL of the client_ca")
                && w.contains("Tern Development CA")),
            "{:?}",
            prepared.warnings()
        );
        pki.client("other", true);
        let refused = handshake(prepared.acceptor.clone(), &pki, "other").await;
        assert!(refused.is_err(), "{refused:?}");
        // Both CRLs in one file: each CA's clients are checked against their own.
        let both = [
            std::fs::read_to_string(other.path("crl.pem")).expect("read"),
            std::fs::read_to_string(pki.path("crl.pem")).expect("read"),
        ]
        .concat();
        std::fs::write(pki.path("both.pem"), both).expect("write");
        let cfg = pki.listener(Some("both.pem"));
        let prepared = TlsReloader::prepare(&cfg).expect("prepare");
        assert!(prepared.warnings().is_empty(), "{:?}", prepared.warnings());
        assert_eq!(
            handshake(prepared.acceptor.clone(), &pki, "other").await,
            Ok(())
        );
        assert!(handshake(prepared.acceptor, &pki, "client")
            .await
            .is_err_and(|e| e.contains("Revoked")));
    }

    #[test]
    fn a_crl_past_its_next_update_is_used_with_a_warning() {
        let pki = Pki::new("stale");
        pki.crl(
            "crl.pem",
            &[
                "-crl_lastupdate",
                "20200101000000Z",
                "-crl_nextupdate",
                "20200201000000Z",
            ],
        );
        let prepared = TlsReloader::prepare(&pki.listener(Some("crl.pem"))).expect("prepare");
        assert!(
            prepared
                .warnings()
                .iter()
                .any(|w| w.contains("past its nextUpdate")),
            "{:?}",
            prepared.warnings()
        );
    }

    #[test]
    fn crl_file_needs_client_ca() {
        let pki = Pki::new("noca");
        pki.crl("crl.pem", &[]);
        let mut cfg = pki.listener(Some("crl.pem"));
        cfg.client_ca = None;
        cfg.require_client_cert = false;
        let err = server_config(&cfg).expect_err("refused");
        assert!(
            err.to_string().contains("crl_file needs client_ca"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_x509_v1_client_certificate_is_refused_and_named() {
        let pki = Pki::new("v1");
        pki.client("old", false);
        let pem = std::fs::read(pki.path("old.pem")).expect("read");
        let der = CertificateDer::from_pem_slice(&pem).expect("pem");
        assert!(v1_subject(&der).is_some());
        let line = v1_refusal(&der, &[]).expect("a v1 line");
        assert!(
            line.contains("X.509 v1 client certificate \"CN=old\""),
            "{line}"
        );
        assert!(
            line.contains(
                "-extfile <(printf \"basicConstraints=CA:FALSE\\nkeyUsage=digitalSignature\\n\
                 extendedKeyUsage=clientAuth\")"
            ),
            "{line}"
        );
        // A v3 certificate gets no such line.
        let v3 = certs(&pki.path("client.pem")).expect("client");
        assert!(v1_refusal(&v3[0], &[]).is_none());

        let acceptor = acceptor(&pki.listener(None));
        let refused = handshake(acceptor.clone(), &pki, "old").await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("UnsupportedCertVersion")),
            "{refused:?}"
        );
        assert_eq!(handshake(acceptor, &pki, "client").await, Ok(()));
    }

    #[test]
    fn an_x509_v1_server_certificate_is_an_error_that_says_so() {
        let pki = Pki::new("v1server");
        pki.key_and_csr("v1server", "localhost");
        pki.sign("v1server", "ca", false);
        let mut cfg = pki.listener(None);
        cfg.cert = pki.path("v1server.pem");
        cfg.key = pki.path("v1server.key");
        let err = server_config(&cfg).expect_err("refused").to_string();
        assert!(
            err.contains("is X.509 v1") && err.contains("-extfile"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_x509_v1_ca_is_a_trust_anchor_with_a_warning() {
        let pki = Pki::new("v1ca");
        // A second CA made v1 (no extensions: `openssl x509 -req -signkey` without
        // `-extfile`) signs a v3 client certificate; the server keeps gen.sh's certificate.
        pki.key_and_csr("old-ca", "Old CA");
        pki.openssl(&[
            "x509",
            "-req",
            "-in",
            "old-ca.csr",
            "-signkey",
            "old-ca.key",
            "-days",
            "30",
            "-out",
            "old-ca.pem",
        ]);
        pki.client_of("device", "old-ca", true);
        let mut cfg = pki.listener(None);
        cfg.client_ca = Some(pki.path("old-ca.pem"));
        let prepared = TlsReloader::prepare(&cfg).expect("prepare");
        assert!(
            prepared
                .warnings()
                .iter()
                .any(|w| w.contains("\"CN=Old CA\" is X.509 v1")),
            "{:?}",
            prepared.warnings()
        );
        assert_eq!(handshake(prepared.acceptor, &pki, "device").await, Ok(()));
    }
}
