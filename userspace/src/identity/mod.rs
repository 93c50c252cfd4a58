//! Workload identities and where their certificates come from.
//!
//! An identity is a SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! as Istio issues them. A [`CertificateProvider`] turns an identity into a certificate; the
//! [`manager::CertificateManager`] caches them and renews them in the background. Three
//! providers exist: the built-in CA ([`ca`]), certificate files per service account
//! ([`files`]) and istiod's CA, asked with a CSR over gRPC ([`istiod`]).

pub mod ca;
pub mod files;
pub mod istiod;
pub mod manager;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a SPIFFE workload identity (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    BadIdentity(String),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("certificate for {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error("certificate for {identity}: the last attempt failed ({last}); the next one is in {retry_in:?}")]
    RetryLater { identity: String, retry_in: Duration, last: String },
    #[error("istiod's CA at {address}: {reason}")]
    CaConfig { address: String, reason: String },
    #[error("the token for istiod's CA, {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("istiod's CA at {address} did not issue a certificate for {identity}: {code:?}: {message}")]
    CaCall { identity: String, address: String, code: tonic::Code, message: String },
    #[error("istiod's CA answered with no certificate for {identity}")]
    EmptyAnswer { identity: String },
    #[error("istiod's CA answered with an unreadable certificate for {identity}: {reason}")]
    BadAnswer { identity: String, reason: String },
    #[error("istiod's CA answered with a certificate for {found:?}, not {identity}")]
    WrongSan { identity: String, found: Vec<String> },
    #[error("istiod's certificate for {identity} does not chain to the mesh root: {reason}")]
    Untrusted { identity: String, reason: String },
    #[error("istiod's certificate for {identity} is not valid yet (it starts in {starts_in:?})")]
    NotYetValid { identity: String, starts_in: Duration },
    #[error("istiod's certificate for {identity} expired {ago:?} ago")]
    Expired { identity: String, ago: Duration },
}

/// A SPIFFE workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self { trust_domain: trust_domain.into(), namespace: namespace.into(), service_account: service_account.into() }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadIdentity(s.into());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| valid_segment(p)) => Ok(Self::new(td, ns, sa)),
            _ => Err(bad()),
        }
    }
}

/// A path segment of a SPIFFE ID: non-empty, no characters that would change its meaning.
pub(crate) fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A workload's certificate chain (leaf first), its private key and the roots it trusts.
pub struct WorkloadCertificate {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the manager should fetch a fresh one. Set by the provider: half the lifetime
    /// for minted certificates, the next reload check for files.
    pub refresh_at: SystemTime,
}

impl WorkloadCertificate {
    /// Builds one from DER parts, reading the validity window from the leaf.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let bad = |reason: String| IdentityError::Certificate { identity: identity.to_string(), reason };
        let leaf = chain.first().ok_or_else(|| bad("empty certificate chain".into()))?;
        if roots.is_empty() {
            return Err(bad("no root certificates".into()));
        }
        // A key that does not load or does not match the leaf would only fail at the first
        // handshake; say so now.
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &rustls::crypto::ring::default_provider())
            .map_err(|e| bad(format!("private key unusable with this certificate: {e}")))?;
        let (not_before, not_after) = validity(leaf).map_err(bad)?;
        let ids = identities_in(leaf).map_err(bad)?;
        if !ids.contains(&identity) {
            let found: Vec<String> = ids.iter().map(ToString::to_string).collect();
            return Err(bad(format!("its URI SAN is {found:?}, not {identity}")));
        }
        Ok(Self { identity, chain, key, roots, not_before, not_after, refresh_at: halfway(not_before, not_after) })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// Serial number of the leaf, in hex (for logs: which certificate is in use).
    pub fn serial(&self) -> String {
        x509_parser::parse_x509_certificate(&self.chain[0])
            .map(|(_, c)| c.tbs_certificate.raw_serial_as_string())
            .unwrap_or_default()
    }
}

// Private keys never reach logs: Debug prints everything but the key.
impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial())
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Where certificates come from.
pub trait CertificateProvider: Send + Sync + 'static {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// A current certificate for `id`.
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>>;
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The midpoint of a validity window: Istio renews workload certificates at half their life.
pub fn halfway(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    not_before + not_after.duration_since(not_before).unwrap_or(Duration::ZERO) / 2
}

/// The validity window of a DER certificate.
pub fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparseable certificate: {e}"))?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 { SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) } else { SystemTime::UNIX_EPOCH }
    };
    Ok((to_time(cert.validity().not_before), to_time(cert.validity().not_after)))
}

/// The SPIFFE identities in a certificate's URI SANs (other SANs are ignored).
pub fn identities_in(der: &CertificateDer<'_>) -> Result<Vec<Identity>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparseable certificate: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("bad subjectAltName: {e}"))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => u.parse().ok(),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_spiffe_ids() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        for bad in [
            "cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/namespace/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns/sh op/sa/web",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} parsed");
        }
    }
}
