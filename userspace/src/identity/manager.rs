//! Caches workload certificates and renews them before they expire.
//!
//! The first request for an identity fetches at once; after that the cached certificate is
//! served and a background task replaces it once its `refresh_at` (half its life, for a CA)
//! passes. A failed fetch backs off per identity (1 s doubling to 150 s, as ztunnel), so a
//! CA that is down sees one request per identity per step, not one per connection; a failed
//! renewal keeps serving the old certificate until it expires. Established TLS sessions never
//! depend on the certificate after the handshake, so a renewal drops no connection.
//!
//! Times are kept on tokio's clock (a certificate's wall-clock times are converted once, when
//! it is stored), so schedules survive wall-clock steps and the tests can pause time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use tokio::time::Instant;

use super::{CertificateProvider, Identity, IdentityError, WorkloadCertificate};
use crate::drain::Watcher;
use crate::sync::lock;

/// Delays after a failed fetch: doubling from the first to the last (ztunnel's cap).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(150);
/// The renewal task sleeps until the next certificate is due (or the cache changes), and
/// runs at most this often: a provider handing out certificates already due for renewal
/// cannot make it spin.
const SWEEP: Duration = Duration::from_millis(500);
/// Renewals under way at once (ztunnel's concurrency): one slow identity holds up no other.
const RENEW_CONCURRENCY: usize = 8;

/// What the manager knows of one identity.
struct Entry {
    /// The certificate to serve while it is valid; `None` while the first fetch keeps failing.
    cert: Option<Arc<WorkloadCertificate>>,
    /// When `cert` expires (tokio's clock).
    expires: Instant,
    /// When to fetch again: the renewal time, or the end of a failure's backoff.
    next_try: Instant,
    /// Failed fetches in a row.
    failures: u32,
    /// The last failure, told to callers who find no certificate during the backoff.
    last_error: String,
}

impl Entry {
    fn valid(&self, now: Instant) -> Option<Arc<WorkloadCertificate>> {
        self.cert.clone().filter(|_| self.expires > now)
    }
}

pub struct CertificateManager {
    provider: Box<dyn CertificateProvider>,
    cache: Mutex<HashMap<Identity, Entry>>,
    /// One fetch at a time per identity, so N connections of a new identity get one
    /// certificate, and a slow fetch of one identity holds up no other.
    fetching: Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
    /// Told when an entry's next try moved: the renewal task then looks at its deadline again.
    scheduled: tokio::sync::Notify,
}

impl CertificateManager {
    pub fn new(provider: Box<dyn CertificateProvider>) -> Arc<Self> {
        Arc::new(Self {
            provider,
            cache: Mutex::default(),
            fetching: Mutex::default(),
            scheduled: tokio::sync::Notify::new(),
        })
    }

    fn cached(&self, id: &Identity) -> Option<Arc<WorkloadCertificate>> {
        lock(&self.cache).get(id).and_then(|e| e.valid(Instant::now()))
    }

    /// A valid certificate for `id`.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        let gate = self.gate(id);
        let _one_at_a_time = gate.lock().await;
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        self.backing_off(id)?;
        let fetched = self.provider.fetch(id).await;
        self.record(id, fetched, false)
    }

    fn gate(&self, id: &Identity) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.fetching).entry(id.clone()).or_default().clone()
    }

    /// The error to give while `id` has no valid certificate and its last fetch failed less
    /// than a backoff ago.
    fn backing_off(&self, id: &Identity) -> Result<(), IdentityError> {
        let now = Instant::now();
        match lock(&self.cache).get(id) {
            Some(e) if e.failures > 0 && e.next_try > now => Err(IdentityError::RetryLater {
                identity: id.to_string(),
                // Whole milliseconds: the message is for people.
                retry_in: Duration::from_millis((e.next_try - now).as_millis().try_into().unwrap_or(u64::MAX)),
                last: e.last_error.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Stores the outcome of a fetch of `id` and says what a caller gets: the certificate
    /// now valid, or the error. A renewal (`renewing`) stores nothing for an identity
    /// forgotten while it was under way.
    fn record(
        &self,
        id: &Identity,
        fetched: Result<WorkloadCertificate, IdentityError>,
        renewing: bool,
    ) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        lock(&self.fetching).retain(|_, g| Arc::strong_count(g) > 1);
        let now = Instant::now();
        let mut cache = lock(&self.cache);
        if renewing && !cache.contains_key(id) {
            return fetched.map(Arc::new);
        }
        let entry = cache.entry(id.clone()).or_insert_with(|| Entry {
            cert: None,
            expires: now,
            next_try: now,
            failures: 0,
            last_error: String::new(),
        });
        let result = match fetched {
            Ok(new) => Ok(self.stored(id, entry, new, now)),
            Err(e) => {
                failed(id, entry, &e, now);
                Err(e)
            }
        };
        self.scheduled.notify_one();
        result
    }

    fn stored(
        &self,
        id: &Identity,
        entry: &mut Entry,
        new: WorkloadCertificate,
        now: Instant,
    ) -> Arc<WorkloadCertificate> {
        entry.failures = 0;
        entry.next_try = on_tokio_clock(new.refresh_at, now);
        match entry.valid(now) {
            // Files unchanged: only the next check moves.
            Some(old) if new.chain == old.chain && new.roots == old.roots => return old,
            Some(old) => {
                tracing::info!(identity = %id, old_serial = %old.serial(), serial = %new.serial(), provider = self.provider.name(), "workload certificate renewed")
            }
            None => {
                tracing::info!(identity = %id, serial = %new.serial(), provider = self.provider.name(), "workload certificate issued")
            }
        }
        entry.expires = on_tokio_clock(new.not_after, now);
        let cert = Arc::new(new);
        entry.cert = Some(cert.clone());
        cert
    }

    /// Forgets identities no longer in `keep` (workloads that left the mesh).
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        lock(&self.cache).retain(|id, _| keep(id));
    }

    /// Renews due certificates until a drain starts. Nothing due, nothing done: the task
    /// sleeps until the earliest next try, woken early only when one moves.
    pub async fn run_renewals(self: Arc<Self>, mut stop: Watcher) {
        let mut earliest = Instant::now();
        loop {
            let due = self.next_try().map(|t| t.max(earliest));
            tokio::select! {
                _ = stop.signalled() => return,
                _ = self.scheduled.notified() => continue,
                _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {}
            }
            self.renew_due().await;
            earliest = Instant::now() + SWEEP;
        }
    }

    /// When the next fetch is due, if any identity is known.
    fn next_try(&self) -> Option<Instant> {
        lock(&self.cache).values().map(|e| e.next_try).min()
    }

    /// One renewal pass: fetches every identity whose `next_try` has come, a few at a time.
    pub async fn renew_due(&self) {
        let now = Instant::now();
        let due: Vec<Identity> =
            lock(&self.cache).iter().filter(|(_, e)| e.next_try <= now).map(|(id, _)| id.clone()).collect();
        futures::stream::iter(due)
            .for_each_concurrent(RENEW_CONCURRENCY, |id| async move { self.renew(&id).await })
            .await;
    }

    async fn renew(&self, id: &Identity) {
        let gate = self.gate(id);
        let _one_at_a_time = gate.lock().await;
        // A caller may have fetched it meanwhile, or the workload left.
        let still_due = lock(&self.cache).get(id).is_some_and(|e| e.next_try <= Instant::now());
        if still_due {
            let fetched = self.provider.fetch(id).await;
            let _ = self.record(id, fetched, true);
        }
    }
}

/// Counts a failed fetch: the next try waits out the backoff, and comes no later than the
/// expiry of a certificate still served.
fn failed(id: &Identity, entry: &mut Entry, e: &IdentityError, now: Instant) {
    entry.failures = entry.failures.saturating_add(1);
    entry.last_error = e.to_string();
    let delay = backoff(entry.failures);
    entry.next_try = now + delay;
    match entry.valid(now) {
        Some(_) => {
            entry.next_try = entry.next_try.min(entry.expires);
            let expires_in = entry.expires - now;
            tracing::warn!(identity = %id, retry_in = ?delay, ?expires_in, "renewing the workload certificate failed, keeping the current one: {e}");
        }
        None => tracing::warn!(identity = %id, retry_in = ?delay, "fetching the workload certificate failed: {e}"),
    }
}

/// The delay after the `failures`-th failure in a row (1 or more).
fn backoff(failures: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RETRY_MAX)
}

/// A wall-clock time as an instant on tokio's clock, counted from `now`.
fn on_tokio_clock(t: SystemTime, now: Instant) -> Instant {
    match t.duration_since(SystemTime::now()) {
        Ok(ahead) => now + ahead,
        Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::BoxFuture;
    use crate::identity::ca::BuiltinCa;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A CA that counts its fetches and can be told to fail for some identities.
    struct Counting {
        ca: BuiltinCa,
        ttl: Duration,
        fetches: AtomicU32,
        failing: Mutex<HashSet<Identity>>,
        /// How long each fetch takes.
        latency: Duration,
    }

    impl Counting {
        fn fail(&self, id: &Identity, fail: bool) {
            let mut f = self.failing.lock().unwrap();
            if fail {
                f.insert(id.clone())
            } else {
                f.remove(id)
            };
        }
        fn fetches(&self) -> u32 {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    impl CertificateProvider for Arc<Counting> {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.latency).await;
                if self.failing.lock().unwrap().contains(id) {
                    return Err(IdentityError::Ca("told to fail".into()));
                }
                self.ca.mint(id, self.ttl)
            })
        }
    }

    fn setup(ttl: Duration) -> (Arc<Counting>, Arc<CertificateManager>) {
        setup_slow(ttl, Duration::ZERO)
    }

    fn setup_slow(ttl: Duration, latency: Duration) -> (Arc<Counting>, Arc<CertificateManager>) {
        let p = Arc::new(Counting {
            ca: BuiltinCa::open(None, "cluster.local", ttl).unwrap(),
            ttl,
            fetches: AtomicU32::new(0),
            failing: Mutex::default(),
            latency,
        });
        (p.clone(), CertificateManager::new(Box::new(p)))
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "ns", sa)
    }

    #[tokio::test]
    async fn concurrent_first_requests_fetch_once() {
        let (p, m) = setup(Duration::from_secs(3600));
        let sa = id("sa");
        let certs = futures::future::join_all((0..16).map(|_| m.get(&sa))).await;
        assert_eq!(p.fetches(), 1);
        let first = certs[0].as_ref().unwrap();
        assert!(certs.iter().all(|c| Arc::ptr_eq(c.as_ref().unwrap(), first)));
        m.renew_due().await;
        assert_eq!(p.fetches(), 1, "nothing is due an hour before half-life");
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life() {
        let (p, m) = setup(Duration::from_secs(60));
        let first = m.get(&id("sa")).await.unwrap();
        tokio::time::advance(Duration::from_secs(29)).await;
        m.renew_due().await;
        assert_eq!(p.fetches(), 1, "not due before half-life");
        tokio::time::advance(Duration::from_secs(2)).await;
        m.renew_due().await;
        assert_eq!(p.fetches(), 2, "due at half-life");
        let second = m.get(&id("sa")).await.unwrap();
        assert_ne!(second.serial(), first.serial());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_keeps_the_old_certificate_until_it_expires_and_backs_off() {
        let (p, m) = setup(Duration::from_secs(600));
        let first = m.get(&id("sa")).await.unwrap();
        p.fail(&id("sa"), true);
        tokio::time::advance(Duration::from_secs(301)).await;
        m.renew_due().await;
        assert_eq!(p.fetches(), 2);
        assert!(
            Arc::ptr_eq(&m.get(&id("sa")).await.unwrap(), &first),
            "a failed renewal must keep the valid certificate"
        );
        // The next tries wait 1 s, then 2 s.
        for (wait, fetches) in [(900, 2), (200, 3), (1900, 3), (200, 4)] {
            tokio::time::advance(Duration::from_millis(wait)).await;
            m.renew_due().await;
            assert_eq!(p.fetches(), fetches, "after another {wait} ms");
        }
        // Past its expiry the old certificate is no longer served.
        tokio::time::advance(Duration::from_secs(300)).await;
        let err = m.get(&id("sa")).await.unwrap_err();
        assert!(err.to_string().contains("told to fail"), "{err}");
        p.fail(&id("sa"), false);
        tokio::time::advance(RETRY_MAX).await;
        let renewed = m.get(&id("sa")).await.unwrap();
        assert_ne!(renewed.serial(), first.serial());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_fetch_backs_off_for_that_identity_only() {
        let (p, m) = setup(Duration::from_secs(600));
        p.fail(&id("a"), true);
        assert!(matches!(m.get(&id("a")).await, Err(IdentityError::Ca(_))));
        // Callers within the backoff get the last error without a fetch.
        let waiting = m.get(&id("a")).await.unwrap_err();
        assert!(matches!(waiting, IdentityError::RetryLater { .. }), "{waiting}");
        assert!(waiting.to_string().contains("told to fail"), "{waiting}");
        assert_eq!(p.fetches(), 1);
        m.get(&id("b")).await.expect("another identity is not held up");
        p.fail(&id("a"), false);
        tokio::time::advance(Duration::from_secs(1)).await;
        m.get(&id("a")).await.expect("fetched again once the backoff is over");
        assert_eq!(p.fetches(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_renewal_task_retries_a_failed_first_fetch_in_the_background() {
        let (p, m) = setup(Duration::from_secs(600));
        p.fail(&id("a"), true);
        assert!(m.get(&id("a")).await.is_err());
        p.fail(&id("a"), false);
        let (stop, watcher) = crate::drain::new();
        let task = tokio::spawn(m.clone().run_renewals(watcher));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(p.fetches(), 2);
        assert!(m.cached(&id("a")).is_some(), "the background retry stored the certificate");
        stop.start(crate::drain::Mode::Immediate);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_renewal_task_sleeps_until_a_certificate_is_due_even_one_it_learns_of_asleep() {
        let (p, m) = setup(Duration::from_secs(600));
        let (stop, watcher) = crate::drain::new();
        let task = tokio::spawn(m.clone().run_renewals(watcher));
        // Nothing known: the task sleeps with no deadline until a first certificate is issued.
        tokio::time::sleep(Duration::from_secs(10)).await;
        m.get(&id("a")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(290)).await;
        assert_eq!(p.fetches(), 1, "renewed before half its life");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(p.fetches(), 2, "not renewed at half its life");
        stop.start(crate::drain::Mode::Immediate);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_under_way_does_not_bring_back_a_forgotten_identity() {
        let (p, m) = setup_slow(Duration::from_secs(60), Duration::from_secs(1));
        m.get(&id("a")).await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        let renewing = tokio::spawn({
            let m = m.clone();
            async move { m.renew_due().await }
        });
        while p.fetches() < 2 {
            tokio::task::yield_now().await;
        }
        m.retain(|_| false);
        renewing.await.unwrap();
        assert!(m.cache.lock().unwrap().is_empty(), "the workload left while its renewal was under way");
    }

    #[test]
    fn backoff_doubles_from_one_second_to_ztunnels_cap() {
        let delays: Vec<u64> = [1, 2, 3, 8, 9, 10, 1000].map(|n| backoff(n).as_secs()).to_vec();
        assert_eq!(delays, [1, 2, 4, 128, 150, 150, 150]);
    }
}
