//! Caches workload certificates and renews them before they expire.
//!
//! The first request for an identity fetches synchronously; after that the cached
//! certificate is served and a background task replaces it once its `refresh_at` passes.
//! A failed renewal keeps the old certificate (it is still valid) and retries with backoff.
//! Established TLS sessions never depend on the certificate after the handshake, so a
//! renewal drops no connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{CertificateProvider, Identity, IdentityError, WorkloadCertificate};
use crate::drain::Watcher;
use crate::sync::lock;

/// Retry delays after a failed renewal: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often the renewal task looks for due certificates.
const SWEEP: Duration = Duration::from_millis(500);

struct Entry {
    cert: Arc<WorkloadCertificate>,
    next_try: SystemTime,
    failures: u32,
}

pub struct CertificateManager {
    provider: Box<dyn CertificateProvider>,
    cache: Mutex<HashMap<Identity, Entry>>,
    /// One first fetch at a time per identity, so N connections of a new identity get one
    /// certificate, and a slow fetch of one identity holds up no other.
    fetching: Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
}

impl CertificateManager {
    pub fn new(provider: Box<dyn CertificateProvider>) -> Arc<Self> {
        Arc::new(Self { provider, cache: Mutex::default(), fetching: Mutex::default() })
    }

    fn cached(&self, id: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let cache = lock(&self.cache);
        cache.get(id).filter(|e| e.cert.not_after > SystemTime::now()).map(|e| e.cert.clone())
    }

    /// A valid certificate for `id`.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        let gate = lock(&self.fetching).entry(id.clone()).or_default().clone();
        let _one_at_a_time = gate.lock().await;
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        let fetched = self.provider.fetch(id).await;
        lock(&self.fetching).retain(|_, g| Arc::strong_count(g) > 1);
        let cert = Arc::new(fetched?);
        tracing::info!(identity = %id, serial = %cert.serial(), provider = self.provider.name(), "workload certificate issued");
        self.store(id, cert.clone());
        Ok(cert)
    }

    fn store(&self, id: &Identity, cert: Arc<WorkloadCertificate>) {
        let mut cache = lock(&self.cache);
        cache.insert(id.clone(), Entry { next_try: cert.refresh_at, cert, failures: 0 });
    }

    /// Forgets identities no longer in `keep` (workloads that left the mesh).
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        lock(&self.cache).retain(|id, _| keep(id));
    }

    /// Renews due certificates until a drain starts.
    pub async fn run_renewals(self: Arc<Self>, mut stop: Watcher) {
        loop {
            tokio::select! {
                _ = stop.signalled() => return,
                _ = tokio::time::sleep(SWEEP) => {}
            }
            self.renew_due().await;
        }
    }

    /// One renewal pass over the cache.
    pub async fn renew_due(&self) {
        let now = SystemTime::now();
        let due: Vec<(Identity, Arc<WorkloadCertificate>)> = {
            let cache = lock(&self.cache);
            cache.iter().filter(|(_, e)| e.next_try <= now).map(|(id, e)| (id.clone(), e.cert.clone())).collect()
        };
        for (id, old) in due {
            let result = self.provider.fetch(&id).await;
            let mut cache = lock(&self.cache);
            let Some(entry) = cache.get_mut(&id) else { continue };
            match result {
                Ok(new) if new.chain == old.chain && new.roots == old.roots => {
                    // Files unchanged: only the next check moves.
                    entry.next_try = new.refresh_at;
                    entry.failures = 0;
                }
                Ok(new) => {
                    tracing::info!(identity = %id, old_serial = %old.serial(), serial = %new.serial(), "workload certificate renewed");
                    *entry = Entry { next_try: new.refresh_at, cert: Arc::new(new), failures: 0 };
                }
                Err(e) => {
                    entry.failures += 1;
                    let delay = RETRY_FIRST.saturating_mul(1 << entry.failures.min(8)).min(RETRY_MAX);
                    entry.next_try = SystemTime::now() + delay;
                    let expires_in = old.not_after.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                    tracing::warn!(identity = %id, retry_in = ?delay, ?expires_in, "renewing the workload certificate failed, keeping the current one: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::BoxFuture;
    use crate::identity::ca::BuiltinCa;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A CA that counts its fetches and can be told to fail.
    struct Counting {
        ca: BuiltinCa,
        ttl: Duration,
        fetches: AtomicU32,
        fail: std::sync::atomic::AtomicBool,
    }

    impl CertificateProvider for Arc<Counting> {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                if self.fail.load(Ordering::SeqCst) {
                    return Err(IdentityError::Ca("told to fail".into()));
                }
                self.ca.mint(id, self.ttl)
            })
        }
    }

    fn setup(ttl: Duration) -> (Arc<Counting>, Arc<CertificateManager>) {
        let p = Arc::new(Counting {
            ca: BuiltinCa::open(None, "cluster.local", ttl).unwrap(),
            ttl,
            fetches: AtomicU32::new(0),
            fail: Default::default(),
        });
        (p.clone(), CertificateManager::new(Box::new(p)))
    }

    #[tokio::test]
    async fn concurrent_first_requests_fetch_once() {
        let (p, m) = setup(Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "ns", "sa");
        let certs = futures::future::join_all((0..16).map(|_| m.get(&id))).await;
        assert_eq!(p.fetches.load(Ordering::SeqCst), 1);
        let first = certs[0].as_ref().unwrap();
        assert!(certs.iter().all(|c| Arc::ptr_eq(c.as_ref().unwrap(), first)));
        m.renew_due().await;
        assert_eq!(p.fetches.load(Ordering::SeqCst), 1, "nothing is due an hour before half-life");
    }

    #[tokio::test]
    async fn renews_at_half_life_and_keeps_the_old_one_when_renewal_fails() {
        let (p, m) = setup(Duration::from_secs(60));
        let id = Identity::new("cluster.local", "ns", "sa");
        let first = m.get(&id).await.unwrap();
        assert!(first.refresh_at > SystemTime::now() + Duration::from_secs(25), "half-life is counted from issuance");
        m.cache.lock().unwrap().get_mut(&id).unwrap().next_try = SystemTime::now();
        p.fail.store(true, Ordering::SeqCst);
        m.renew_due().await;
        assert!(Arc::ptr_eq(&m.get(&id).await.unwrap(), &first), "a failed renewal must keep the valid certificate");
        p.fail.store(false, Ordering::SeqCst);
        // The retry waits for its backoff; make it due now.
        m.cache.lock().unwrap().get_mut(&id).unwrap().next_try = SystemTime::now();
        m.renew_due().await;
        let second = m.get(&id).await.unwrap();
        assert_ne!(second.serial(), first.serial());
        assert_eq!(p.fetches.load(Ordering::SeqCst), 3);
    }
}
