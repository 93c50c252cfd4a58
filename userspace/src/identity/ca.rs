//! The built-in certificate authority: mints short-lived workload certificates from a root
//! it loads from a directory (creating it there on first use) or keeps in memory.
//!
//! Meant for the lab and small clusters. Every node that must trust the others needs the
//! same root, so in a cluster the directory is a mounted Secret shared by the DaemonSet.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{BoxFuture, CertificateProvider, Identity, IdentityError, WorkloadCertificate};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Root lifetime when the CA creates one.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Minted certificates start this far in the past, so a peer whose clock is a little behind
/// still accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

pub struct BuiltinCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    ttl: Duration,
    /// Where the root came from, for logs.
    pub origin: String,
}

impl BuiltinCa {
    /// Loads the root from `dir`, or creates one there (key written 0600) when the
    /// directory holds none. `None` keeps a fresh root in memory only: fine for one node,
    /// but no other node will trust it.
    pub fn open(dir: Option<&Path>, trust_domain: &str, ttl: Duration) -> Result<Self, IdentityError> {
        let (issuer, root, origin) = match dir {
            None => {
                let (issuer, root) = generate_root(trust_domain)?;
                (issuer, root, "an in-memory root (other nodes will not trust it; use --ca-dir)".to_string())
            }
            Some(dir) => {
                let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
                if !cert_path.exists() && !key_path.exists() {
                    let (issuer, root) = generate_root(trust_domain)?;
                    write_root(dir, &root, &issuer)?;
                    tracing::info!(dir = %dir.display(), "created a new CA root");
                }
                let (issuer, root) = load_root(&cert_path, &key_path)?;
                (issuer, root, format!("the root in {}", dir.display()))
            }
        };
        Ok(Self { issuer, root, ttl, origin })
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Mints a certificate for `id` valid for `ttl` from now (less clock skew).
    pub fn mint(&self, id: &Identity, ttl: Duration) -> Result<WorkloadCertificate, IdentityError> {
        self.mint_at(id, SystemTime::now(), ttl)
    }

    /// Mints a certificate valid from `start - skew` for `ttl`. Tests use a start in the past
    /// to obtain expired certificates.
    pub fn mint_at(
        &self,
        id: &Identity,
        start: SystemTime,
        ttl: Duration,
    ) -> Result<WorkloadCertificate, IdentityError> {
        let ca_err = |e: rcgen::Error| IdentityError::Ca(format!("minting a certificate for {id}: {e}"));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(ca_err)?)];
        // Istio's workload certificates have an empty subject; the identity is the SAN.
        params.distinguished_name = DistinguishedName::new();
        params.not_before = (start - CLOCK_SKEW).into();
        params.not_after = (start + ttl).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(ca_err)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cert = WorkloadCertificate::new(id.clone(), vec![cert.der().clone()], key, vec![self.root.clone()])?;
        // Half-life counted from issuance: the back-dating for clock skew must not make a
        // short-lived certificate due at once.
        cert.refresh_at = start + ttl / 2;
        Ok(cert)
    }
}

/// The CA as a provider: every fetch mints a fresh certificate.
pub struct CaProvider(pub BuiltinCa);

impl CertificateProvider for CaProvider {
    fn name(&self) -> &'static str {
        "builtin-ca"
    }

    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async move { self.0.mint(id, self.0.ttl) })
    }
}

fn generate_root(trust_domain: &str) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>), IdentityError> {
    let ca_err = |e: rcgen::Error| IdentityError::Ca(format!("creating a root: {e}"));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name.push(DnType::CommonName, "meshpath root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    let cert = params.self_signed(&key).map_err(ca_err)?;
    Ok((Issuer::new(params, key), cert.der().clone()))
}

fn load_root(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>), IdentityError> {
    let file_err = |p: &Path, reason: String| IdentityError::File { path: p.display().to_string(), reason };
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| file_err(p, e.to_string()));
    let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
    // The key's error never includes the key text.
    let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(key_path, format!("not a usable private key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| file_err(cert_path, format!("not a usable CA certificate: {e}")))?;
    let root =
        super::files::parse_certs(&cert_pem, cert_path)?.into_iter().next().expect("parse_certs returns at least one");
    Ok((issuer, root))
}

/// Writes the root certificate (0644) and key (0600). Each file is written under a
/// temporary name and renamed, so a reader never sees half a key.
fn write_root(dir: &Path, root: &CertificateDer<'_>, issuer: &Issuer<'_, KeyPair>) -> Result<(), IdentityError> {
    let io_err =
        |p: &Path, e: std::io::Error| IdentityError::File { path: p.display().to_string(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let cert_pem = pem_encode("CERTIFICATE", root);
    let key_pem = issuer.key().serialize_pem();
    for (name, text, mode) in [(ROOT_KEY_FILE, key_pem, 0o600), (ROOT_CERT_FILE, cert_pem, 0o644)] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        // A fresh file, never an existing one or a symlink: the mode must apply.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    }
    Ok(())
}

/// PEM text of one DER block.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mints_certificates_for_the_identity_asked() {
        let ca = BuiltinCa::open(None, "cluster.local", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("cluster.local", "shop", "web");
        let c = ca.mint(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(super::super::identities_in(&c.chain[0]).unwrap(), vec![id]);
        let life = c.not_after.duration_since(c.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(3600) + CLOCK_SKEW);
        assert!(c.refresh_at < c.not_after && c.refresh_at > c.not_before);
        assert!(!format!("{c:?}").contains("PRIVATE"), "Debug must not print the key");
    }

    #[test]
    fn root_is_written_once_with_a_private_key_file_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("meshpath-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = BuiltinCa::open(Some(&dir), "td.test", Duration::from_secs(60)).unwrap();
        let mode = std::fs::metadata(dir.join(ROOT_KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let second = BuiltinCa::open(Some(&dir), "td.test", Duration::from_secs(60)).unwrap();
        assert_eq!(first.root(), second.root(), "the second open must load, not regenerate");
        // Certificates of the reloaded CA chain to the same root.
        let c = second.mint(&Identity::new("td.test", "a", "b"), Duration::from_secs(60)).unwrap();
        assert_eq!(c.roots, vec![first.root().clone()]);
        std::fs::write(dir.join(ROOT_KEY_FILE), "garbage").unwrap();
        let err = BuiltinCa::open(Some(&dir), "td.test", Duration::from_secs(60)).err().unwrap().to_string();
        assert!(err.contains(ROOT_KEY_FILE) && err.contains("not a usable private key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
