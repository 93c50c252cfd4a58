//! The lab's mesh root: it signs the fake istiod's serving certificate (what a node proxy
//! checks against its root file) and, in the CA, the workloads' certificates.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("creating the lab root: {0}")]
    Root(rcgen::Error),
    #[error("a serving certificate for {names:?}: {source}")]
    Serving { names: Vec<String>, source: rcgen::Error },
}

const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this far back, for clocks a little behind.
const SKEW: Duration = Duration::from_secs(60);

/// A self-signed root (ECDSA P-256) kept in memory.
pub struct LabRoot {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate (PEM) and its private key (PKCS#8 PEM).
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl LabRoot {
    /// A new root named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(PkiError::Root)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "meshpath lab");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_window(&mut params);
        let cert = params.self_signed(&key).map_err(PkiError::Root)?;
        Ok(Self { pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The root certificate, PEM: what a node proxy's root file holds.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Its private key (PKCS#8 PEM), for a CA that signs with it ([`super::ca::CaSettings`]).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// What signs (for the CA side).
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// A serving certificate for `names` (DNS names or IP addresses).
    pub fn serving(&self, names: &[String]) -> Result<CertifiedKey, PkiError> {
        let err = |source| PkiError::Serving { names: names.to_vec(), source };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(err)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names.first().map_or("istiod", String::as_str));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_window(&mut params);
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn set_window(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - SKEW).into();
    params.not_after = (now + LIFETIME).into();
}
