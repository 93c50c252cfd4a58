//! Certificates read from files, one directory per service account, as a mounted Secret
//! (or cert-manager's CSI driver) provides them:
//!
//! ```text
//! <dir>/<namespace>/<service-account>/cert-chain.pem   leaf first, then intermediates
//! <dir>/<namespace>/<service-account>/key.pem          PKCS#8, SEC1 or PKCS#1
//! <dir>/<namespace>/<service-account>/root-cert.pem    the roots peers are checked against
//! ```
//!
//! The file names are Istio's. The manager asks again every [`RELOAD_INTERVAL`], so a
//! rotated Secret is picked up without a restart; live connections keep their session.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{BoxFuture, CertificateProvider, Identity, IdentityError, WorkloadCertificate};

pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// How often files of identities in use are read again.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct FileProvider {
    dir: PathBuf,
}

impl FileProvider {
    pub fn new(dir: &Path) -> Result<Self, IdentityError> {
        if !dir.is_dir() {
            return Err(IdentityError::File { path: dir.display().to_string(), reason: "not a directory".into() });
        }
        Ok(Self { dir: dir.to_owned() })
    }

    /// The directory holding `id`'s files.
    pub fn dir_for(&self, id: &Identity) -> PathBuf {
        self.dir.join(&id.namespace).join(&id.service_account)
    }

    fn load(&self, id: &Identity) -> Result<WorkloadCertificate, IdentityError> {
        let dir = self.dir_for(id);
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p)
                .map(|b| (b, p.clone()))
                .map_err(|e| IdentityError::File { path: p.display().to_string(), reason: e.to_string() })
        };
        let (chain_pem, chain_path) = read(CERT_CHAIN_FILE)?;
        let (key_pem, key_path) = read(KEY_FILE)?;
        let (roots_pem, roots_path) = read(ROOT_CERT_FILE)?;
        let chain = parse_certs(&String::from_utf8_lossy(&chain_pem), &chain_path)?;
        let roots = parse_certs(&String::from_utf8_lossy(&roots_pem), &roots_path)?;
        // The parser's error names the problem, never the key's bytes.
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| IdentityError::File {
            path: key_path.display().to_string(),
            reason: format!("no usable private key: {e}"),
        })?;
        let mut cert = WorkloadCertificate::new(id.clone(), chain, key, roots)?;
        // Whoever writes the files renews them; we only look again.
        cert.refresh_at = SystemTime::now() + RELOAD_INTERVAL;
        Ok(cert)
    }
}

impl CertificateProvider for FileProvider {
    fn name(&self) -> &'static str {
        "files"
    }

    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        let (me, id) = (self.clone(), id.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.load(&id))
                .await
                .unwrap_or_else(|e| Err(IdentityError::Ca(format!("reading certificate files: {e}"))))
        })
    }
}

/// Every certificate in a PEM text; at least one.
pub fn parse_certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let err = |reason: String| IdentityError::File { path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{BuiltinCa, pem_encode};

    /// Writes `id`'s three files from a freshly minted certificate.
    fn write(ca: &BuiltinCa, root: &Path, id: &Identity) -> WorkloadCertificate {
        let c = ca.mint(id, Duration::from_secs(3600)).unwrap();
        let dir = root.join(&id.namespace).join(&id.service_account);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CERT_CHAIN_FILE), pem_encode("CERTIFICATE", &c.chain[0])).unwrap();
        std::fs::write(dir.join(KEY_FILE), pem_encode("PRIVATE KEY", c.key().secret_der())).unwrap();
        std::fs::write(dir.join(ROOT_CERT_FILE), pem_encode("CERTIFICATE", ca.root())).unwrap();
        c
    }

    #[tokio::test]
    async fn reads_a_service_accounts_files_and_sees_them_change() {
        let root = std::env::temp_dir().join(format!("meshpath-files-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let ca = BuiltinCa::open(None, "cluster.local", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("cluster.local", "shop", "web");
        let written = write(&ca, &root, &id);
        let p = FileProvider::new(&root).unwrap();
        let got = p.fetch(&id).await.unwrap();
        assert_eq!(got.chain, written.chain);
        assert!(got.refresh_at <= SystemTime::now() + RELOAD_INTERVAL);

        let rotated = write(&ca, &root, &id);
        assert_eq!(p.fetch(&id).await.unwrap().chain, rotated.chain);

        // Files of another identity are refused: the SAN must match the directory.
        let other = Identity::new("cluster.local", "shop", "db");
        std::fs::create_dir_all(p.dir_for(&other)).unwrap();
        for f in [CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE] {
            std::fs::copy(p.dir_for(&id).join(f), p.dir_for(&other).join(f)).unwrap();
        }
        let err = p.fetch(&other).await.unwrap_err().to_string();
        assert!(err.contains("not spiffe://cluster.local/ns/shop/sa/db"), "{err}");

        std::fs::write(p.dir_for(&id).join(KEY_FILE), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let err = p.fetch(&id).await.unwrap_err().to_string();
        assert!(err.contains("private key unusable") && !err.contains("AAAA"), "{err}");
        let missing = Identity::new("cluster.local", "shop", "nobody");
        assert!(p.fetch(&missing).await.unwrap_err().to_string().contains("cert-chain.pem"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
