//! TLS on the proxy listener (rustls): certificates read from PEM files and chosen by SNI
//! (exact names, `*.` wildcards, a default), ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3 only
//! with rustls' cipher suites, optional client certificates (mTLS). The live settings sit
//! behind an `ArcSwap`, so a reload (SIGHUP, `POST /v1/reload`, or the files changing on
//! disk) swaps them for new connections while open ones carry on (docs/config.md, "TLS").
//!
//! Loading also checks what `tollgate check` reports: unreadable files, a key that does not
//! match its certificate, an expired or not yet valid certificate, a certificate without
//! a DNS name to be chosen by.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// One certificate (with its chain) and its private key, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Names it is served for; empty = the certificate's DNS subject alternative names.
    pub names: Vec<String>,
    /// Served when no name matches (else the first certificate is).
    pub default: bool,
}

/// The oldest protocol version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// The listener's TLS settings, checked by `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub certificates: Vec<CertFiles>,
    pub min_version: MinVersion,
    /// A name no certificate has gets a handshake failure instead of the default.
    pub reject_unknown_sni: bool,
    /// CA certificates client certificates must chain to (mTLS).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: a client without a certificate is refused (else it may proceed).
    pub client_auth_required: bool,
}

impl TlsOptions {
    /// Every file these settings read, to watch for changes.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .certificates
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .collect();
        files.extend(self.client_ca.clone());
        files
    }
}

/// A certificate loaded and checked.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-case names it is served for (`*.example.com` for wildcards).
    pub names: Vec<String>,
    /// Unix seconds of the certificate's `notAfter`.
    pub not_after: i64,
    /// How metrics and logs name it: its first name, or its file.
    pub label: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads a certificate chain and its key and checks them: every error names the file and
/// the reason.
pub fn load_certificate(files: &CertFiles) -> Result<LoadedCert, String> {
    let cert_path = files.cert.display();
    let key_path = files.key.display();
    let chain = read_certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("key {key_path}: cannot read a PEM private key: {}", pem_error(e)))?;
    let certified = CertifiedKey::from_der(chain.clone(), key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!("key {key_path} does not match certificate {cert_path}"),
        e => format!("key {key_path}: unusable with certificate {cert_path}: {e}"),
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| format!("certificate {cert_path}: cannot parse: {e}"))?;
    let validity = parsed.validity();
    let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    let now = unix_now();
    if now >= not_after {
        return Err(format!("certificate {cert_path} expired at {}", validity.not_after));
    }
    if now < not_before {
        return Err(format!(
            "certificate {cert_path} is not valid before {}",
            validity.not_before
        ));
    }
    let names = if files.names.is_empty() {
        let san: Vec<String> = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if san.is_empty() {
            return Err(format!(
                "certificate {cert_path} has no DNS subject alternative name: list the names it serves in `names`"
            ));
        }
        san
    } else {
        files.names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    Ok(LoadedCert {
        key: Arc::new(certified),
        label: names.first().cloned().unwrap_or_else(|| cert_path.to_string()),
        names,
        not_after,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("certificate {shown}: cannot read: {}", pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate {shown}: invalid PEM: {}", pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!("certificate {shown}: no CERTIFICATE block in the file"));
    }
    Ok(chain)
}

fn pem_error(error: rustls_pki_types::pem::Error) -> String {
    match error {
        rustls_pki_types::pem::Error::Io(e) => e.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no matching PEM block in the file".into(),
        e => format!("{e:?}"),
    }
}

/// Certificates by name: exact names, then `*.` wildcards one label deep, then the
/// default.
#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    reject_unknown: bool,
}

impl SniResolver {
    pub fn new(certificates: &[(LoadedCert, bool)], reject_unknown: bool) -> SniResolver {
        let mut resolver = SniResolver {
            reject_unknown,
            ..Default::default()
        };
        for (loaded, _) in certificates {
            for name in &loaded.names {
                let table = match name.strip_prefix("*.") {
                    Some(suffix) => resolver.wildcard.entry(suffix.to_string()),
                    None => resolver.exact.entry(name.clone()),
                };
                // The first certificate listed for a name wins.
                table.or_insert_with(|| loaded.key.clone());
            }
        }
        // The certificate marked `default`, else the first one.
        resolver.default = certificates
            .iter()
            .find(|(_, is_default)| *is_default)
            .or(certificates.first())
            .map(|(loaded, _)| loaded.key.clone());
        resolver
    }

    /// The certificate for `server_name` (none: no SNI sent); `None` refuses the handshake.
    pub fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = self.wildcard.get(parent)
        {
            return Some(key.clone());
        }
        if self.reject_unknown {
            None
        } else {
            self.default.clone()
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(client_hello.server_name())
    }
}

/// Who a verified client certificate names: its first DNS name, else its subject's
/// common name. `None` without a client certificate.
pub fn client_identity(connection: &rustls::ServerConnection) -> Option<String> {
    let cert = connection.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let dns = parsed.subject_alternative_name().ok().flatten().and_then(|ext| {
        ext.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
    });
    dns.or_else(|| {
        parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    })
}

/// What `/metrics` shows of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub label: String,
    pub not_after: i64,
}

/// Builds the rustls configuration of `options`; every error names its file.
pub fn server_config(options: &TlsOptions) -> Result<(ServerConfig, Vec<CertInfo>), String> {
    let mut loaded = Vec::new();
    for files in &options.certificates {
        loaded.push((load_certificate(files)?, files.default));
    }
    if loaded.is_empty() {
        return Err("no certificate configured".into());
    }
    let info = loaded
        .iter()
        .map(|(c, _)| CertInfo {
            label: c.label.clone(),
            not_after: c.not_after,
        })
        .collect();
    let versions: &[&rustls::SupportedProtocolVersion] = match options.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &options.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("client_ca {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if options.client_auth_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("client_ca {}: {e}", path.display()))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver::new(&loaded, options.reject_unknown_sni)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // TLS 1.3 resumption by ticket (stateless; the key rotates on its own).
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| format!("session tickets: {e}"))?;
    Ok((config, info))
}

/// The settings Tollgate connects to TLS upstreams with: endpoints verified against the
/// CAs in `ca` (default: the Mozilla roots of `webpki-roots`), an optional client
/// certificate, and `alpn` offered.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certificates(path)? {
                roots.add(cert).map_err(|e| format!("tls_ca {}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let chain = read_certificates(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("key {}: cannot read a PEM private key: {}", key.display(), pem_error(e)))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Client settings no certificate satisfies: what a pool whose TLS files stopped loading
/// uses, so its handshakes fail instead of falling back to clear text.
pub fn client_config_trusting_nothing() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(RootCertStore::empty()).with_no_client_auth())
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth()
        })
}

/// The listener's live TLS settings and their counters.
pub struct ServerTls {
    config: ArcSwap<ServerConfig>,
    certificates: ArcSwap<Vec<CertInfo>>,
    handshakes: AtomicU64,
    handshake_failures: AtomicU64,
    reloads_failed: AtomicU64,
}

impl ServerTls {
    pub fn new(options: &TlsOptions) -> Result<ServerTls, String> {
        let (config, info) = server_config(options)?;
        Ok(ServerTls {
            config: ArcSwap::from_pointee(config),
            certificates: ArcSwap::from_pointee(info),
            handshakes: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        })
    }

    /// Loads `options` again; on any error the running certificates stay.
    pub fn reload(&self, options: &TlsOptions) -> Result<(), String> {
        match server_config(options) {
            Ok((config, info)) => {
                self.config.store(Arc::new(config));
                self.certificates.store(Arc::new(info));
                Ok(())
            }
            Err(error) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// An acceptor with the current settings (one `Arc` clone).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    pub fn handshake_done(&self, ok: bool) {
        let counter = if ok { &self.handshakes } else { &self.handshake_failures };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (completed handshakes, failed handshakes, failed reloads).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.handshakes.load(Ordering::Relaxed),
            self.handshake_failures.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    pub fn certificates(&self) -> Arc<Vec<CertInfo>> {
        self.certificates.load_full()
    }
}

#[cfg(test)]
mod tests;
