//! Certificates from istiod's CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`,
//! as ztunnel asks for them in its shared (node proxy) mode.
//!
//! Each fetch makes a fresh ECDSA P-256 key and a CSR with an empty subject and one URI SAN,
//! the identity, and sends it with `metadata.ImpersonatedIdentity` set to that identity: a
//! node proxy asks for the identities of the pods on its node, and istiod checks that some pod
//! of that service account runs there. The call carries `authorization: Bearer <token>` (the
//! token file is read again for every call: the kubelet rotates it) and `clusterid`. istiod is
//! verified against the mesh root file (read again for every call: the root can rotate), and
//! so is the answer: its leaf must name exactly the identity asked, be valid now and chain to
//! that root.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prost_types::{Struct, Value, value::Kind};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{BoxFuture, CertificateProvider, Identity, IdentityError, WorkloadCertificate};
use crate::sync::lock;
use crate::xds::proto::istio::v1::auth::IstioCertificateRequest;
use crate::xds::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

/// The metadata key naming the identity a node proxy asks for (istiod's
/// `security.ImpersonatedIdentity`).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The gRPC metadata istiod reads the caller's cluster from.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// A leaf that starts this little after our clock is still taken: istiod stamps `now` as
/// its start, and its clock may be a little ahead of ours.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PINGs on an idle connection to istiod, as ztunnel's: a dead peer is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where istiod's CA is and how to reach it. The environment names are the ztunnel chart's
/// and ztunnel's own, so a chart's values carry over.
#[derive(clap::Args, Clone, Debug)]
pub struct IstiodCaArgs {
    /// istiod's CA (gRPC over TLS); `https://` is assumed when no scheme is given.
    #[arg(long = "ca-address", env = "CA_ADDRESS", default_value = "https://istiod.istio-system.svc:15012")]
    pub address: String,
    /// The name istiod's serving certificate is checked against, when it is not the address's host.
    #[arg(long = "ca-hostname", env = "ALT_CA_HOSTNAME")]
    pub hostname: Option<String>,
    /// This cluster's name in the mesh, sent as `clusterid`: the xDS settings' (`CLUSTER_ID`,
    /// defined there once).
    #[arg(skip)]
    pub cluster_id: String,
    /// The projected service-account token (audience `istio-ca`), read for every request: the
    /// xDS settings' (`AUTH_TOKEN`, defined there once).
    #[arg(skip)]
    pub token: PathBuf,
    /// The mesh root (the `istio-ca-root-cert` ConfigMap), which istiod and its answers are checked against.
    #[arg(long = "ca-root", env = "CA_ROOT_CA", default_value = "/var/run/secrets/istio/root-cert.pem")]
    pub root: PathBuf,
    /// How long the certificates asked for last (`90s`, `30m`, `24h`, `1d`, or seconds); renewed at half that.
    #[arg(long = "secret-ttl", env = "SECRET_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub ttl: Duration,
}

/// The provider: one gRPC channel to istiod, rebuilt when the root file changes.
pub struct IstiodCa {
    args: IstiodCaArgs,
    address: String,
    cluster_id: MetadataValue<Ascii>,
    /// The root file's text the channel was built with, and the channel.
    channel: Mutex<Option<(Vec<u8>, Channel)>>,
}

impl IstiodCa {
    /// Checks the settings; nothing is read or connected before the first fetch.
    pub fn new(args: IstiodCaArgs) -> Result<Self, IdentityError> {
        let address = with_scheme(&args.address)?;
        let cluster_id = MetadataValue::try_from(args.cluster_id.as_str()).map_err(|_| IdentityError::CaConfig {
            address: address.clone(),
            reason: format!("cluster id {:?} cannot be sent as gRPC metadata", args.cluster_id),
        })?;
        Ok(Self { args, address, cluster_id, channel: Mutex::new(None) })
    }

    async fn create(&self, id: &Identity) -> Result<WorkloadCertificate, IdentityError> {
        let (root_pem, roots) = read_roots(&self.args.root).await?;
        let channel = self.channel(root_pem)?;
        let (csr, key) = csr(id)?;
        let mut request = tonic::Request::new(certificate_request(id, csr, self.args.ttl));
        let md = request.metadata_mut();
        md.insert("authorization", bearer(&self.args.token).await?);
        md.insert(CLUSTER_ID_HEADER, self.cluster_id.clone());
        let answer = IstioCertificateServiceClient::new(channel).create_certificate(request).await.map_err(|s| {
            IdentityError::CaCall {
                identity: id.to_string(),
                address: self.address.clone(),
                code: s.code(),
                message: describe(&s),
            }
        })?;
        accept(id, &answer.into_inner().cert_chain, key, roots, SystemTime::now())
    }

    /// The channel for this root: the one built last, unless the root file changed since.
    fn channel(&self, root_pem: Vec<u8>) -> Result<Channel, IdentityError> {
        let mut cached = lock(&self.channel);
        if let Some((pem, channel)) = cached.as_ref()
            && *pem == root_pem
        {
            return Ok(channel.clone());
        }
        let err = |e: tonic::transport::Error| IdentityError::CaConfig {
            address: self.address.clone(),
            reason: e.to_string(),
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&root_pem));
        if let Some(host) = &self.args.hostname {
            tls = tls.domain_name(host);
        }
        let channel = Endpoint::from_shared(self.address.clone())
            .map_err(err)?
            .tls_config(tls)
            .map_err(err)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .connect_lazy();
        *cached = Some((root_pem, channel.clone()));
        Ok(channel)
    }
}

impl CertificateProvider for IstiodCa {
    fn name(&self) -> &'static str {
        "istiod-ca"
    }

    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(self.create(id))
    }
}

/// A status's message, and for a transport failure what caused it (tonic's message alone
/// says "tcp connect error", not why).
fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let c_text = c.to_string();
        // tonic's wrapper says nothing of its own.
        if c_text != "transport error" && !text.contains(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

/// `https://` when the address has no scheme (as ztunnel); plaintext is refused.
fn with_scheme(address: &str) -> Result<String, IdentityError> {
    let full = if address.contains("://") { address.to_string() } else { format!("https://{address}") };
    if !full.starts_with("https://") {
        return Err(IdentityError::CaConfig { address: address.into(), reason: "only https:// is supported".into() });
    }
    Ok(full)
}

/// The mesh root file: its text (to notice a change) and its certificates.
async fn read_roots(path: &Path) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), IdentityError> {
    let text = tokio::fs::read(path)
        .await
        .map_err(|e| IdentityError::File { path: path.display().to_string(), reason: e.to_string() })?;
    let roots = super::files::parse_certs(&String::from_utf8_lossy(&text), path)?;
    Ok((text, roots))
}

/// `Bearer <token>`, the token read from its file now.
async fn bearer(path: &Path) -> Result<MetadataValue<Ascii>, IdentityError> {
    let err = |reason: String| IdentityError::Token { path: path.display().to_string(), reason };
    let text = tokio::fs::read_to_string(path).await.map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    // The error never includes the token.
    MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| err("not a token (it has characters a header cannot carry)".into()))
}

/// A fresh P-256 key and a CSR for `id`: empty subject, one URI SAN (marked critical, as a
/// SAN must be when the subject is empty), signed with ECDSA-SHA256.
pub fn csr(id: &Identity) -> Result<(String, PrivateKeyDer<'static>), IdentityError> {
    let ca_err = |e: rcgen::Error| IdentityError::Ca(format!("making a CSR for {id}: {e}"));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(ca_err)?)];
    let pem = params.serialize_request(&key).and_then(|r| r.pem()).map_err(ca_err)?;
    Ok((pem, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
}

/// The request for `id`: the CSR, the lifetime in seconds and the identity to impersonate.
pub fn certificate_request(id: &Identity, csr: String, ttl: Duration) -> IstioCertificateRequest {
    let impersonate = Value { kind: Some(Kind::StringValue(id.to_string())) };
    IstioCertificateRequest {
        csr,
        validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        metadata: Some(Struct { fields: [(IMPERSONATED_IDENTITY.to_string(), impersonate)].into() }),
    }
}

/// Checks istiod's answer for `id` at `now` and makes it a workload certificate. `answer` is
/// istiod's `cert_chain`: PEM texts, leaf first, root last.
pub fn accept(
    id: &Identity,
    answer: &[String],
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    now: SystemTime,
) -> Result<WorkloadCertificate, IdentityError> {
    let certs = parse_answer(id, answer)?;
    let (leaf, rest) = certs.split_first().ok_or_else(|| IdentityError::EmptyAnswer { identity: id.to_string() })?;
    check_san(id, leaf)?;
    let verify_at = check_validity(id, leaf, now)?;
    check_chain(id, leaf, rest, &roots, verify_at)?;
    // Peers have the root: only the leaf and intermediates are presented.
    let chain: Vec<CertificateDer<'static>> = certs.into_iter().filter(|c| !roots.contains(c)).collect();
    WorkloadCertificate::new(id.clone(), chain, key, roots)
}

/// Every certificate of the answer, in order (an element may hold several PEM blocks).
fn parse_answer(id: &Identity, answer: &[String]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bad = |reason: String| IdentityError::BadAnswer { identity: id.to_string(), reason };
    let mut certs = Vec::new();
    for (i, text) in answer.iter().enumerate() {
        let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text.as_bytes()).collect();
        let parsed = parsed.map_err(|e| bad(format!("element {i}: {e}")))?;
        if parsed.is_empty() && !text.trim().is_empty() {
            return Err(bad(format!("element {i} holds no CERTIFICATE block")));
        }
        certs.extend(parsed);
    }
    Ok(certs)
}

/// The leaf's subject alternative names must be exactly one URI, `id`.
fn check_san(id: &Identity, leaf: &CertificateDer<'_>) -> Result<(), IdentityError> {
    let found =
        subject_alt_names(leaf).map_err(|reason| IdentityError::BadAnswer { identity: id.to_string(), reason })?;
    if found != [id.to_string()] {
        return Err(IdentityError::WrongSan { identity: id.to_string(), found });
    }
    Ok(())
}

/// Every SAN of a certificate, URIs as they are and other kinds as `kind:value`.
fn subject_alt_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparseable leaf: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("bad subjectAltName: {e}"))?;
    let names = san.map(|s| s.value.general_names.clone()).unwrap_or_default();
    Ok(names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => other.to_string(),
        })
        .collect())
}

/// The leaf must be valid at `now` (a start a little ahead is forgiven). Returns the time to
/// verify the chain at.
fn check_validity(id: &Identity, leaf: &CertificateDer<'_>, now: SystemTime) -> Result<SystemTime, IdentityError> {
    let (not_before, not_after) =
        super::validity(leaf).map_err(|reason| IdentityError::BadAnswer { identity: id.to_string(), reason })?;
    if let Ok(ago) = now.duration_since(not_after) {
        return Err(IdentityError::Expired { identity: id.to_string(), ago: whole_secs(ago) });
    }
    match not_before.duration_since(now) {
        Ok(starts_in) if starts_in > CLOCK_SKEW => {
            Err(IdentityError::NotYetValid { identity: id.to_string(), starts_in })
        }
        Ok(_) => Ok(not_before),
        Err(_) => Ok(now),
    }
}

fn whole_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// The leaf must chain to one of `roots` through the answer's other certificates, for client
/// authentication (what an HBONE client presents it for).
fn check_chain(
    id: &Identity,
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    at: SystemTime,
) -> Result<(), IdentityError> {
    let untrusted = |reason: String| IdentityError::Untrusted { identity: id.to_string(), reason };
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| untrusted(format!("mesh root unusable: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(store.into(), crate::tls::provider())
        .build()
        .map_err(|e| untrusted(e.to_string()))?;
    let at = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    verifier.verify_client_cert(leaf, intermediates, at).map_err(|e| untrusted(e.to_string()))?;
    Ok(())
}

/// A lifetime as ztunnel's `SECRET_TTL` takes it: `<n><unit>`… with units `s`, `m`, `h`, `d`,
/// or plain seconds; from 10 s to 90 days (istiod's default maximum).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a lifetime (e.g. 24h, 90m, 3600)");
    let secs: u64 = if let Ok(n) = s.parse() { n } else { sum_of_units(s).ok_or_else(bad)? };
    let ttl = Duration::from_secs(secs);
    if !(Duration::from_secs(10)..=Duration::from_secs(90 * 24 * 3600)).contains(&ttl) {
        return Err(format!("{s:?}: a lifetime is from 10 s to 90 days"));
    }
    Ok(ttl)
}

fn sum_of_units(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        let unit = match rest[digits..].chars().next()? {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[digits + 1..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose,
    };
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn id() -> Identity {
        Identity::new("cluster.local", "shop", "web")
    }

    struct Root {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn root() -> Root {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let der = params.self_signed(&key).unwrap().der().clone();
        Root { issuer: Issuer::new(params, key), der }
    }

    /// Signs `csr` as istiod would, for `sans`, valid from `start` for `ttl`: istiod's answer.
    fn sign(root: &Root, csr: &str, sans: &[&str], start: SystemTime, ttl: Duration) -> Vec<String> {
        let mut req = CertificateSigningRequestParams::from_pem(csr).unwrap();
        req.params.subject_alt_names = sans.iter().map(|s| SanType::URI(s.to_string().try_into().unwrap())).collect();
        req.params.not_before = start.into();
        req.params.not_after = (start + ttl).into();
        req.params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        req.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = req.signed_by(&root.issuer).unwrap();
        vec![leaf.pem(), crate::identity::ca::pem_encode("CERTIFICATE", &root.der)]
    }

    /// A fresh CSR for `id()`, istiod's answer to it from `root`, and what `accept` makes of it.
    fn answered(
        root: &Root,
        mesh_root: &Root,
        sans: &[&str],
        start: SystemTime,
    ) -> Result<WorkloadCertificate, IdentityError> {
        let (csr, key) = csr(&id()).unwrap();
        let answer = sign(root, &csr, sans, start, HOUR);
        accept(&id(), &answer, key, vec![mesh_root.der.clone()], SystemTime::now())
    }

    #[test]
    fn the_csr_is_p256_sha256_with_an_empty_subject_and_one_critical_uri_san() {
        let (pem, key) = csr(&id()).unwrap();
        let der = ::pem::parse(&pem).unwrap();
        assert_eq!(der.tag(), "CERTIFICATE REQUEST");
        let (_, req) = X509CertificationRequest::from_der(der.contents()).unwrap();
        req.verify_signature().expect("self-signed with its key");
        assert_eq!(req.signature_algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256);
        let info = &req.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        let spki = &info.subject_pki;
        assert_eq!(spki.algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        assert_eq!(curve, Some(x509_parser::oid_registry::OID_EC_P256));
        let exts: Vec<_> = req.requested_extensions().map(|e| e.collect()).unwrap_or_default();
        assert_eq!(exts.len(), 1, "only the SAN is requested: {exts:?}");
        let ParsedExtension::SubjectAlternativeName(san) = exts[0] else { panic!("not a SAN: {:?}", exts[0]) };
        assert_eq!(san.general_names, vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]);
        let attributes = req.certification_request_info.iter_attributes().count();
        assert_eq!(attributes, 1, "one attribute: the extension request");
        assert!(rustls::crypto::ring::sign::any_ecdsa_type(&key).is_ok(), "the key is an ECDSA key rustls can use");
    }

    #[test]
    fn the_san_is_marked_critical() {
        let (pem, _) = csr(&id()).unwrap();
        let der = ::pem::parse(&pem).unwrap();
        let (_, req) = X509CertificationRequest::from_der(der.contents()).unwrap();
        let attr = req.certification_request_info.iter_attributes().next().unwrap();
        let x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(ext) = attr.parsed_attribute() else {
            panic!("not an extension request")
        };
        assert!(ext.extensions.iter().all(|e| e.critical), "an empty subject makes the SAN critical");
    }

    #[test]
    fn the_request_impersonates_the_identity_for_the_lifetime_asked() {
        let r = certificate_request(&id(), "CSR".into(), Duration::from_secs(86400));
        assert_eq!((r.csr.as_str(), r.validity_duration), ("CSR", 86400));
        let fields = r.metadata.unwrap().fields;
        assert_eq!(fields.len(), 1);
        assert_eq!(
            fields[IMPERSONATED_IDENTITY].kind,
            Some(Kind::StringValue("spiffe://cluster.local/ns/shop/sa/web".into()))
        );
    }

    #[test]
    fn an_answer_for_the_identity_asked_is_accepted_without_the_root() {
        let r = root();
        let c = answered(&r, &r, &["spiffe://cluster.local/ns/shop/sa/web"], SystemTime::now()).unwrap();
        assert_eq!(c.chain.len(), 1, "the root is not presented");
        assert_eq!(c.roots, vec![r.der.clone()]);
        assert!(c.refresh_at > SystemTime::now() + HOUR / 2 - Duration::from_secs(5));
        // istiod's clock a little ahead of ours is forgiven.
        answered(&r, &r, &["spiffe://cluster.local/ns/shop/sa/web"], SystemTime::now() + Duration::from_secs(30))
            .unwrap();
    }

    #[test]
    fn a_leaf_for_another_identity_or_with_more_names_is_refused() {
        let r = root();
        for sans in [
            &["spiffe://cluster.local/ns/shop/sa/db"][..],
            &["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/db"],
            &[],
        ] {
            let err = answered(&r, &r, sans, SystemTime::now()).unwrap_err();
            assert!(matches!(&err, IdentityError::WrongSan { found, .. } if found == sans), "{sans:?}: {err}");
        }
    }

    #[test]
    fn an_expired_or_future_leaf_is_refused() {
        let r = root();
        let san = &["spiffe://cluster.local/ns/shop/sa/web"][..];
        let err = answered(&r, &r, san, SystemTime::now() - 2 * HOUR).unwrap_err();
        assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
        let err = answered(&r, &r, san, SystemTime::now() + HOUR).unwrap_err();
        assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err}");
    }

    #[test]
    fn a_chain_to_another_root_is_refused() {
        let (mesh, other) = (root(), root());
        let err = answered(&other, &mesh, &["spiffe://cluster.local/ns/shop/sa/web"], SystemTime::now()).unwrap_err();
        assert!(matches!(err, IdentityError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("does not chain to the mesh root"), "{err}");
    }

    #[test]
    fn an_empty_or_unreadable_answer_is_refused() {
        let r = root();
        let (_, key) = csr(&id()).unwrap();
        let err = accept(&id(), &[], key.clone_key(), vec![r.der.clone()], SystemTime::now()).unwrap_err();
        assert!(matches!(err, IdentityError::EmptyAnswer { .. }), "{err}");
        let err = accept(&id(), &["junk".into()], key, vec![r.der.clone()], SystemTime::now()).unwrap_err();
        assert!(matches!(err, IdentityError::BadAnswer { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_token_is_read_trimmed_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("meshpath-istiod-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("istio-token");
        let err = bearer(&path).await.unwrap_err();
        assert!(matches!(&err, IdentityError::Token { .. }) && err.to_string().contains("istio-token"), "{err}");
        std::fs::write(&path, "header.payload.sig\n").unwrap();
        assert_eq!(bearer(&path).await.unwrap(), "Bearer header.payload.sig");
        std::fs::write(&path, "  \n").unwrap();
        assert!(bearer(&path).await.unwrap_err().to_string().contains("empty"));
        std::fs::write(&path, "secret\u{1}value").unwrap();
        let err = bearer(&path).await.unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(with_scheme("istiod.istio-system.svc:15012").unwrap(), "https://istiod.istio-system.svc:15012");
        assert_eq!(with_scheme("https://127.0.0.1:15012").unwrap(), "https://127.0.0.1:15012");
        assert!(with_scheme("http://istiod:15010").is_err(), "plaintext is refused");
        for (text, secs) in [("24h", 86400), ("90m", 5400), ("1h30m", 5400), ("3600", 3600), ("1d", 86400)] {
            assert_eq!(parse_ttl(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        for bad in ["", "h", "5", "24x", "-1h", "91d", "1h 30m"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} parsed");
        }
    }
}
