//! The fake istiod's CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`, signing
//! CSRs with the lab root and checking callers as istiod does (`security/pkg/server/ca/`
//! `server.go`, `node_auth.go` and `authenticate/kubeauth/kube_jwt.go` in istio/istio):
//!
//! - **authentication**: the `authorization: Bearer <token>` metadata must name a token of the
//!   lab's table (istiod asks the API server's TokenReview); a `clusterid` other than this
//!   cluster's is refused (istiod has no kube client for it; an absent one means this cluster).
//!   Refused: `Unauthenticated "request authenticate failure"`.
//! - **the identity issued**: without `ImpersonatedIdentity` it is the caller's own, whatever
//!   the CSR asks (istiod signs the caller's identity, never the CSR's SAN). With it, the
//!   caller's account must be a trusted node account (`CA_TRUSTED_NODE_ACCOUNTS`, by default
//!   `istio-system/ztunnel`), its token's pod must exist with that UID and account, and some pod
//!   of the asked namespace/account must run on that pod's node. Refused: `Unauthenticated
//!   "request impersonation authentication failure"` (opaque, as istiod; the reason is in the
//!   record).
//! - **the lifetime**: `validity_duration` ≤ 0 takes the default (24 h); above the maximum
//!   (90 days) is `InvalidArgument`, as is a CSR that does not parse or verify.
//!
//! The answer is istiod's: the leaf (start now, `digitalSignature | keyEncipherment`,
//! `serverAuth + clientAuth`, not a CA), then the root. Every request is recorded. Tests can
//! make it answer wrongly ([`Fault`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshpath::identity::Identity;
use meshpath::sync::lock;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

use super::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use super::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

/// istiod's messages, word for word.
pub const AUTHENTICATE_FAILURE: &str = "request authenticate failure";
pub const IMPERSONATION_FAILURE: &str = "request impersonation authentication failure";
/// The metadata key of the identity a node proxy asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// istiod's default and maximum workload certificate lifetimes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The names the fake's serving certificate carries (istiod's service, and loopback).
pub const SERVING_NAMES: [&str; 2] = ["istiod.istio-system.svc", "localhost"];
/// Records kept (the oldest go first).
const RECORDS_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the lab root: {0}")]
    Root(String),
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("the CA listener: {0}")]
    Listener(String),
}

/// Who a token belongs to: the pod it was minted for (a projected token is pod-bound).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
}

/// A pod of the lab's cluster, as the node authorizer's index sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub node: String,
}

impl Caller {
    /// The caller of a token bound to pod `namespace/pod` (uid `uid-<pod>`).
    pub fn new(namespace: &str, service_account: &str, pod: &str) -> Self {
        let (namespace, service_account) = (namespace.into(), service_account.into());
        Self { namespace, service_account, pod: pod.into(), pod_uid: format!("uid-{pod}") }
    }
}

impl LabPod {
    /// Pod `namespace/name` on `node` (uid `uid-<name>`), running as `service_account`.
    pub fn new(namespace: &str, name: &str, service_account: &str, node: &str) -> Self {
        let (namespace, service_account, node) = (namespace.into(), service_account.into(), node.into());
        Self { namespace, name: name.into(), uid: format!("uid-{name}"), service_account, node }
    }
}

/// How the fake is set up; the tables can change while it runs ([`FakeCa::set_pods`], …).
pub struct CaSettings {
    /// The lab root (PEM): the fake signs with it.
    pub root_cert_pem: String,
    pub root_key_pem: String,
    pub trust_domain: String,
    pub cluster_id: String,
    /// Bearer token → its caller.
    pub tokens: HashMap<String, Caller>,
    pub pods: Vec<LabPod>,
    /// `namespace/service-account` of the accounts allowed to impersonate.
    pub trusted_node_accounts: Vec<String>,
}

impl CaSettings {
    /// istiod's defaults around the lab root: trust domain `cluster.local`, cluster
    /// `Kubernetes`, `istio-system/ztunnel` trusted, no tokens and no pods yet.
    pub fn new(root_cert_pem: &str, root_key_pem: &str) -> Self {
        Self {
            root_cert_pem: root_cert_pem.into(),
            root_key_pem: root_key_pem.into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            tokens: HashMap::new(),
            pods: Vec::new(),
            trusted_node_accounts: vec!["istio-system/ztunnel".into()],
        }
    }
}

/// A wrong answer, for tests of the client's checks (applied after the caller passed every
/// check; recorded like any answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A leaf for another identity than the one decided.
    WrongSan,
    /// A leaf that expired an hour ago.
    Expired,
    /// A leaf that starts in an hour.
    NotYetValid,
    /// A leaf and root of another CA.
    UnrelatedRoot,
    /// An empty `cert_chain`.
    Empty,
    /// This gRPC status instead of an answer.
    Refuse(Code),
}

/// One `CreateCertificate` call, as the fake saw and answered it.
#[derive(Clone, Debug)]
pub struct CsrRecord {
    /// `namespace/service-account` of the caller's token; `None` when it was not authenticated.
    pub caller: Option<String>,
    /// The URI SANs the CSR asked for.
    pub asked: Vec<String>,
    /// `metadata.ImpersonatedIdentity`, when set.
    pub impersonated: Option<String>,
    /// The SAN of the leaf issued, and its serial (hex, as `WorkloadCertificate::serial`).
    pub issued: Option<String>,
    pub serial: Option<String>,
    pub validity_duration: i64,
    /// `Code::Ok` for an answer; otherwise the status returned.
    pub code: Code,
    /// Why it was refused, as istiod would log it.
    pub reason: String,
    /// The call's gRPC metadata, pseudo-headers aside (the token too: it is a lab).
    pub headers: BTreeMap<String, String>,
    /// The request's `metadata` fields (strings as they are, other values in Debug form).
    pub metadata: BTreeMap<String, String>,
    /// What the CSR is made of; `None` when it does not parse.
    pub csr: Option<CsrFields>,
    /// The leaf issued (DER).
    pub leaf: Option<Vec<u8>>,
}

/// The fields of a CSR a CA looks at, as text (OIDs by their short names where known), to
/// compare node proxies' requests field by field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsrFields {
    /// The subject (empty for an empty one).
    pub subject: String,
    /// The public key's algorithm and its parameter (the curve, for EC keys).
    pub key_algorithm: String,
    pub key_parameter: Option<String>,
    pub signature_algorithm: String,
    /// Every extension requested: its name and whether it is critical.
    pub extensions: Vec<(String, bool)>,
    /// Every subject alternative name, of any kind.
    pub sans: Vec<String>,
    /// The attributes of the request (the extension request among them).
    pub attributes: Vec<String>,
}

struct Tables {
    tokens: HashMap<String, Caller>,
    pods: Vec<LabPod>,
    trusted: Vec<String>,
    fault: Option<Fault>,
    records: VecDeque<CsrRecord>,
}

struct Inner {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    trust_domain: String,
    cluster_id: String,
    tables: Mutex<Tables>,
}

/// The fake CA; clones share their state.
#[derive(Clone)]
pub struct FakeCa {
    inner: Arc<Inner>,
}

/// A refusal: the status for the caller, the reason for the record.
struct Refusal {
    status: Status,
    reason: String,
}

impl Refusal {
    fn new(code: Code, message: &str, reason: impl Into<String>) -> Self {
        Self { status: Status::new(code, message), reason: reason.into() }
    }
}

impl FakeCa {
    pub fn new(s: CaSettings) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(&s.root_key_pem).map_err(|e| CaError::Root(format!("key: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_pem(&s.root_cert_pem, key).map_err(|e| CaError::Root(format!("certificate: {e}")))?;
        let tables = Tables {
            tokens: s.tokens,
            pods: s.pods,
            trusted: s.trusted_node_accounts,
            fault: None,
            records: VecDeque::new(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                issuer,
                root_pem: s.root_cert_pem,
                trust_domain: s.trust_domain,
                cluster_id: s.cluster_id,
                tables: Mutex::new(tables),
            }),
        })
    }

    /// The gRPC service, for a listener that serves it beside others.
    pub fn service(&self) -> IstioCertificateServiceServer<FakeCa> {
        IstioCertificateServiceServer::new(self.clone())
    }

    pub fn set_token(&self, token: &str, caller: Caller) {
        lock(&self.inner.tables).tokens.insert(token.into(), caller);
    }

    pub fn set_pods(&self, pods: Vec<LabPod>) {
        lock(&self.inner.tables).pods = pods;
    }

    pub fn set_trusted_node_accounts(&self, accounts: Vec<String>) {
        lock(&self.inner.tables).trusted = accounts;
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        lock(&self.inner.tables).fault = fault;
    }

    /// Every call so far, oldest first.
    pub fn records(&self) -> Vec<CsrRecord> {
        lock(&self.inner.tables).records.iter().cloned().collect()
    }

    /// A serving certificate and key (PEM) from the lab root for `names` (DNS) and 127.0.0.1,
    /// for a TLS listener clients check against the lab root.
    pub fn serving_certificate(&self, names: &[&str]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.inner.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Serves the CA alone on its own TLS listener at `addr` (port 0: any), until the handle
    /// is dropped.
    pub async fn serve(&self, addr: SocketAddr) -> Result<ServingCa, CaError> {
        let (cert, key) = self.serving_certificate(&SERVING_NAMES)?;
        let listener = |e: &dyn std::fmt::Display| CaError::Listener(e.to_string());
        let incoming = TcpIncoming::bind(addr).map_err(|e| listener(&e))?;
        let local = incoming.local_addr().map_err(|e| listener(&e))?;
        let tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
        let mut server = Server::builder().tls_config(tls).map_err(|e| listener(&e))?;
        let router = server.add_service(self.service());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, async { stopped.await.unwrap_or(()) }).await {
                tracing::warn!("the fake CA's listener stopped: {e}");
            }
        });
        Ok(ServingCa { addr: local, stop: Some(stop), task })
    }

    /// Who is calling: the token's caller, if the metadata authenticates as istiod requires.
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Caller, Status> {
        self.caller(md).map_err(|r| r.status)
    }

    fn caller(&self, md: &MetadataMap) -> Result<Caller, Refusal> {
        let refuse = |reason: String| Refusal::new(Code::Unauthenticated, AUTHENTICATE_FAILURE, reason);
        let cluster: Vec<_> = md.get_all("clusterid").iter().filter_map(|v| v.to_str().ok()).collect();
        // One value naming another cluster: istiod has no kube client for it.
        if let [c] = cluster.as_slice()
            && !c.is_empty()
            && *c != self.inner.cluster_id
        {
            return Err(refuse(format!("could not get cluster {c}'s kube client")));
        }
        let token = md
            .get_all("authorization")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| refuse("no bearer token exists in HTTP authorization header".into()))?;
        let tables = lock(&self.inner.tables);
        tables.tokens.get(token).cloned().ok_or_else(|| refuse("failed to validate the JWT: unknown token".into()))
    }

    /// May `caller` have a certificate for `asked`? istiod's node authorizer.
    fn may_impersonate(&self, caller: &Caller, asked: &str) -> Result<(), String> {
        let tables = lock(&self.inner.tables);
        let account = format!("{}/{}", caller.namespace, caller.service_account);
        if !tables.trusted.contains(&account) {
            return Err(format!("caller ({account}) is not allowed to impersonate"));
        }
        let wanted: Identity =
            asked.parse().map_err(|_| format!("failed to validate impersonated identity {asked}"))?;
        let pod = tables
            .pods
            .iter()
            .find(|p| p.namespace == caller.namespace && p.name == caller.pod)
            .ok_or_else(|| format!("failed to lookup pod: {}/{} not found", caller.namespace, caller.pod))?;
        if pod.uid != caller.pod_uid {
            return Err(format!("pod found, but UID does not match: {} vs {}", pod.uid, caller.pod_uid));
        }
        if pod.service_account != caller.service_account {
            return Err(format!("pod found, but ServiceAccount does not match: {}", pod.service_account));
        }
        let node = &pod.node;
        let found = tables
            .pods
            .iter()
            .any(|p| p.node == *node && p.namespace == wanted.namespace && p.service_account == wanted.service_account);
        if !found {
            return Err(format!(
                "no instances of \"{}/{}\" found on node {node:?}",
                wanted.namespace, wanted.service_account
            ));
        }
        Ok(())
    }

    /// The checks and the signature; fills `record` as it goes.
    fn answer(
        &self,
        md: &MetadataMap,
        req: &IstioCertificateRequest,
        record: &mut CsrRecord,
    ) -> Result<Vec<String>, Refusal> {
        let caller = self.caller(md)?;
        record.caller = Some(format!("{}/{}", caller.namespace, caller.service_account));
        let san = match &record.impersonated {
            Some(asked) => {
                self.may_impersonate(&caller, asked)
                    .map_err(|reason| Refusal::new(Code::Unauthenticated, IMPERSONATION_FAILURE, reason))?;
                asked.clone()
            }
            None => Identity::new(&self.inner.trust_domain, &caller.namespace, &caller.service_account).to_string(),
        };
        let ttl = lifetime(req.validity_duration)?;
        let fault = lock(&self.inner.tables).fault;
        let (chain, leaf) = self.sign(&req.csr, &san, ttl, fault)?;
        record.issued = leaf_san(&leaf);
        record.serial = serial(&leaf);
        record.leaf = Some(leaf);
        Ok(chain)
    }

    /// Signs `csr` for `san`, valid from now for `ttl`, twisted by `fault`. Returns the
    /// answer's chain (PEM, leaf first, root last) and the leaf's DER.
    fn sign(
        &self,
        csr: &str,
        san: &str,
        ttl: Duration,
        fault: Option<Fault>,
    ) -> Result<(Vec<String>, Vec<u8>), Refusal> {
        let invalid =
            |e: rcgen::Error| Refusal::new(Code::InvalidArgument, &format!("CSR signing error ({e})"), e.to_string());
        let mut req = CertificateSigningRequestParams::from_pem(csr).map_err(invalid)?;
        let now = SystemTime::now();
        let (san, start) = match fault {
            Some(Fault::WrongSan) => (format!("{san}-not-asked"), now),
            Some(Fault::Expired) => (san.to_string(), now - ttl - Duration::from_secs(3600)),
            Some(Fault::NotYetValid) => (san.to_string(), now + Duration::from_secs(3600)),
            Some(Fault::Refuse(code)) => return Err(Refusal::new(code, "fault injected", "fault injected")),
            _ => (san.to_string(), now),
        };
        req.params = leaf_params(&san, start, ttl).map_err(invalid)?;
        let unrelated = match fault {
            Some(Fault::UnrelatedRoot) => Some(unrelated_root().map_err(invalid)?),
            _ => None,
        };
        let (issuer, root_pem) = match &unrelated {
            Some((issuer, pem)) => (issuer, pem.as_str()),
            None => (&self.inner.issuer, self.inner.root_pem.as_str()),
        };
        let leaf = req.signed_by(issuer).map_err(invalid)?;
        let chain = match fault {
            Some(Fault::Empty) => Vec::new(),
            // istiod ends each element with a newline.
            _ => vec![format!("{}\n", leaf.pem().trim_end()), format!("{}\n", root_pem.trim_end())],
        };
        Ok((chain, leaf.der().to_vec()))
    }

    fn push(&self, record: CsrRecord) {
        let mut tables = lock(&self.inner.tables);
        if tables.records.len() >= RECORDS_MAX {
            tables.records.pop_front();
        }
        tables.records.push_back(record);
    }
}

#[tonic::async_trait]
impl IstioCertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let md = request.metadata().clone();
        let req = request.into_inner();
        let mut record = CsrRecord {
            caller: None,
            asked: asked_sans(&req.csr),
            impersonated: impersonated(&req),
            issued: None,
            serial: None,
            validity_duration: req.validity_duration,
            code: Code::Ok,
            reason: String::new(),
            headers: super::xds::headers(&md),
            metadata: super::xds::struct_strings(req.metadata.as_ref()),
            csr: csr_fields(&req.csr),
            leaf: None,
        };
        let answer = self.answer(&md, &req, &mut record);
        if let Err(r) = &answer {
            (record.code, record.reason) = (r.status.code(), r.reason.clone());
        }
        self.push(record);
        answer.map(|cert_chain| Response::new(IstioCertificateResponse { cert_chain })).map_err(|r| r.status)
    }
}

/// The fake on its own listener; stops when dropped.
pub struct ServingCa {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServingCa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// The lifetime istiod gives: the default for ≤ 0, refused above the maximum.
fn lifetime(secs: i64) -> Result<Duration, Refusal> {
    if secs <= 0 {
        return Ok(DEFAULT_TTL);
    }
    let ttl = Duration::from_secs(secs.unsigned_abs());
    if ttl > MAX_TTL {
        let why = format!("requested TTL {ttl:?} is greater than the max allowed TTL {MAX_TTL:?}");
        return Err(Refusal::new(Code::InvalidArgument, &format!("CSR signing error ({why})"), why));
    }
    Ok(ttl)
}

/// A workload leaf as istiod makes it: empty subject, the one URI SAN, from `start` for `ttl`.
fn leaf_params(san: &str, start: SystemTime, ttl: Duration) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(san.to_string().try_into()?)];
    p.not_before = start.into();
    p.not_after = (start + ttl).into();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A root no one trusts, and its PEM.
fn unrelated_root() -> Result<(Issuer<'static, KeyPair>, String), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let pem = params.self_signed(&key)?.pem();
    Ok((Issuer::new(params, key), pem))
}

/// The URI SANs a CSR asks for (none when it does not parse: the refusal says why).
fn asked_sans(csr: &str) -> Vec<String> {
    let Ok(req) = CertificateSigningRequestParams::from_pem(csr) else { return Vec::new() };
    req.params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect()
}

/// What `csr` (PEM) is made of, if it parses.
pub fn csr_fields(csr: &str) -> Option<CsrFields> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::cri_attributes::ParsedCriAttribute;
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::FromDer;
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr.as_bytes()).ok()?;
    let (_, req) = X509CertificationRequest::from_der(&pem.contents).ok()?;
    let info = &req.certification_request_info;
    let spki = &info.subject_pki.algorithm;
    let requested: Vec<_> = info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(r.extensions.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let sans = requested.iter().filter_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.iter().map(|n| n.to_string())),
        _ => None,
    });
    Some(CsrFields {
        subject: info.subject.to_string(),
        key_algorithm: oid_name(&spki.algorithm),
        key_parameter: spki.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| oid_name(&o)),
        signature_algorithm: oid_name(&req.signature_algorithm.algorithm),
        extensions: requested.iter().map(|e| (oid_name(&e.oid), e.critical)).collect(),
        sans: sans.flatten().collect(),
        attributes: info.iter_attributes().map(|a| oid_name(&a.oid)).collect(),
    })
}

/// An OID's short name, or its dotted form.
fn oid_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    x509_parser::objects::oid2sn(oid, registry).map_or_else(|_| oid.to_id_string(), str::to_owned)
}

fn impersonated(req: &IstioCertificateRequest) -> Option<String> {
    use prost_types::value::Kind;
    let v = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
    match &v.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn leaf_san(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    })
}

fn serial(der: &[u8]) -> Option<String> {
    x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c.tbs_certificate.raw_serial_as_string())
}
