//! TLS for HBONE as ztunnel does it: TLS 1.3 only, ALPN `h2`, mutual authentication by
//! SPIFFE identities. The client sends no SNI and checks the server's URI SAN against the
//! identity it expects; the server requires a client certificate from its own trust domain.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};

use crate::identity::{Identity, WorkloadCertificate, identities_in};

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration for {identity}: {source}")]
    Config { identity: String, source: rustls::Error },
    #[error("root certificates for {identity}: {reason}")]
    Roots { identity: String, reason: String },
}

/// The crypto provider both sides use: ring, with ztunnel's TLS 1.3 suites (AES-GCM) and
/// its key-exchange groups first.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider, kx_group};
    Arc::new(CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_256_GCM_SHA384, cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![kx_group::SECP256R1, kx_group::SECP384R1, kx_group::X25519],
        ..default_provider()
    })
}

fn roots(cert: &WorkloadCertificate) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for r in &cert.roots {
        store
            .add(r.clone())
            .map_err(|e| TlsError::Roots { identity: cert.identity.to_string(), reason: e.to_string() })?;
    }
    Ok(Arc::new(store))
}

/// The server side of an HBONE listener, presenting `cert` (the destination workload's).
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |source| TlsError::Config { identity: cert.identity.to_string(), source };
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(cert)?, provider.clone())
        .build()
        .map_err(|e| err(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(TrustDomainVerifier { inner, trust_domain: cert.identity.trust_domain.clone() });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key())
        .map_err(err)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients never resume (see `client_config`): tickets would be wasted bytes.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The client side of an HBONE connection: presents `cert` (the source workload's) and
/// accepts only a server proving `expected`.
pub fn client_config(cert: &WorkloadCertificate, expected: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let err = |source| TlsError::Config { identity: cert.identity.to_string(), source };
    let cfg = client_builder(&roots(cert)?, expected, &cert.identity)?
        .with_client_auth_cert(cert.chain.clone(), cert.key())
        .map_err(err)?;
    Ok(finish_client(cfg))
}

/// A client that presents no certificate: what a non-mesh client looks like to an HBONE
/// server. Only the lab's tests use it, to show such clients are refused.
#[cfg(feature = "testing")]
pub fn anonymous_client_config(
    roots: &[CertificateDer<'static>],
    expected: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| TlsError::Roots { identity: expected.to_string(), reason: e.to_string() })?;
    }
    Ok(finish_client(client_builder(&Arc::new(store), expected, expected)?.with_no_client_auth()))
}

fn client_builder(
    roots: &Arc<RootCertStore>,
    expected: &Identity,
    me: &Identity,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        roots: roots.clone(),
        expected: expected.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { identity: me.to_string(), source })?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

fn finish_client(mut cfg: ClientConfig) -> Arc<ClientConfig> {
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // The destination is an IP and the identity is checked on the SAN: SNI would only leak
    // the address. Resumption is off as in ztunnel: every connection proves its identity.
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// The name handed to the TLS client: unused for verification (see [`IdentityVerifier`])
/// and not sent (no SNI).
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// The peer's SPIFFE identity in `trust_domain` (the one the server's verifier accepted),
/// from its leaf certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Option<Identity> {
    identities_in(certs?.first()?).ok()?.into_iter().find(|id| id.trust_domain == trust_domain)
}

fn bad_cert(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(Reason(reason)))))
}

#[derive(Debug)]
struct Reason(String);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reason {}

/// Client side: the chain must lead to our roots (server-auth usage) and carry the
/// expected SPIFFE identity. Host names play no part.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let ids = identities_in(end_entity).map_err(bad_cert)?;
        if ids.contains(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            let found: Vec<String> = ids.iter().map(ToString::to_string).collect();
            Err(bad_cert(format!("server identity {found:?} is not the expected {}", self.expected)))
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so this is never called.
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server side: webpki's client verification (chain to our roots, client-auth usage,
/// validity), then a SPIFFE identity in our trust domain.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
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
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let ids = identities_in(end_entity).map_err(bad_cert)?;
        if ids.iter().any(|id| id.trust_domain == self.trust_domain) {
            Ok(verified)
        } else {
            let found: Vec<String> = ids.iter().map(ToString::to_string).collect();
            Err(bad_cert(format!("client identity {found:?} is not in trust domain {}", self.trust_domain)))
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::BuiltinCa;
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs a handshake over an in-memory pipe; returns the client's and server's results.
    async fn handshake(
        client: &WorkloadCertificate,
        expected: &Identity,
        server: &WorkloadCertificate,
    ) -> (Result<(), String>, Result<Option<Identity>, String>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client_config(client, expected).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(server).unwrap());
        let (c, s) = tokio::join!(
            async {
                let mut t = connector.connect(server_name(), a).await.map_err(|e| e.to_string())?;
                t.write_all(b"x").await.map_err(|e| e.to_string())?;
                t.flush().await.map_err(|e| e.to_string())?;
                // Stay until the server has read and closed.
                let _ = t.read(&mut [0u8; 1]).await;
                Ok::<_, String>(())
            },
            async {
                let mut t = acceptor.accept(b).await.map_err(|e| e.to_string())?;
                let mut one = [0u8; 1];
                t.read_exact(&mut one).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(peer_identity(t.get_ref().1.peer_certificates(), &server.identity.trust_domain))
            }
        );
        (c, s)
    }

    fn id(td: &str, sa: &str) -> Identity {
        Identity::new(td, "ns", sa)
    }

    #[tokio::test]
    async fn mutual_auth_succeeds_and_shows_the_client_identity() {
        let ca = BuiltinCa::open(None, "td", Duration::from_secs(600)).unwrap();
        let (cli, srv) = (
            ca.mint(&id("td", "client"), Duration::from_secs(600)).unwrap(),
            ca.mint(&id("td", "server"), Duration::from_secs(600)).unwrap(),
        );
        let (c, s) = handshake(&cli, &id("td", "server"), &srv).await;
        assert_eq!(c, Ok(()));
        assert_eq!(s, Ok(Some(id("td", "client"))));
    }

    #[tokio::test]
    async fn client_refuses_a_server_with_another_identity() {
        let ca = BuiltinCa::open(None, "td", Duration::from_secs(600)).unwrap();
        let (cli, srv) = (
            ca.mint(&id("td", "client"), Duration::from_secs(600)).unwrap(),
            ca.mint(&id("td", "impostor"), Duration::from_secs(600)).unwrap(),
        );
        let (c, _) = handshake(&cli, &id("td", "server"), &srv).await;
        assert!(c.unwrap_err().contains("is not the expected spiffe://td/ns/ns/sa/server"));
    }

    #[tokio::test]
    async fn server_refuses_other_trust_domains_foreign_roots_and_expired_certificates() {
        let ca = BuiltinCa::open(None, "td", Duration::from_secs(600)).unwrap();
        let srv = ca.mint(&id("td", "server"), Duration::from_secs(600)).unwrap();
        // Same root, other trust domain.
        let other_td = ca.mint(&id("elsewhere", "client"), Duration::from_secs(600)).unwrap();
        let (_, s) = handshake(&other_td, &id("td", "server"), &srv).await;
        assert!(s.unwrap_err().contains("not in trust domain td"));
        // Right trust domain, unknown root (the client trusts the server's root though).
        let foreign = BuiltinCa::open(None, "foreign-org", Duration::from_secs(600)).unwrap();
        let mut stranger = foreign.mint(&id("td", "client"), Duration::from_secs(600)).unwrap();
        stranger.roots = vec![ca.root().clone()];
        let (_, s) = handshake(&stranger, &id("td", "server"), &srv).await;
        let e = s.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
        // Expired an hour ago.
        let old = ca
            .mint_at(&id("td", "client"), SystemTime::now() - Duration::from_secs(7200), Duration::from_secs(3600))
            .unwrap();
        let (_, s) = handshake(&old, &id("td", "server"), &srv).await;
        let e = s.unwrap_err();
        assert!(e.contains("certificate expired"), "{e}");
    }
}
