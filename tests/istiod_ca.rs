//! meshpath's client of istiod's CA (`meshpath::identity::istiod`) against the lab's fake
//! istiod CA (`meshpath_lab::istiod::ca`), on a TLS loopback listener: no root, no lab.
//!
//! The fake's cluster: node `n1` runs the node proxy (`istio-system/ztunnel`, pod
//! `ztunnel-n1`) and `shop/web`; node `n2` runs `shop/db`. Tokens: `node-token` is the node
//! proxy's, `web-token` the web pod's.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use meshpath::identity::ca::BuiltinCa;
use meshpath::identity::istiod::{IstiodCa, IstiodCaArgs, accept, csr};
use meshpath::identity::manager::CertificateManager;
use meshpath::identity::{CertificateProvider, Identity, IdentityError, WorkloadCertificate};
use meshpath::xds::proto::istio::v1::auth::IstioCertificateRequest;
use meshpath::xds::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use meshpath_lab::istiod::ca::{
    AUTHENTICATE_FAILURE, CaSettings, Caller, CsrRecord, FakeCa, Fault, IMPERSONATION_FAILURE, LabPod, SERVING_NAMES,
    ServingCa,
};
use tonic::Code;

const TD: &str = "cluster.local";

fn web() -> Identity {
    Identity::new(TD, "shop", "web")
}

fn db() -> Identity {
    Identity::new(TD, "shop", "db")
}

/// A directory with the lab root, a token file and the root file; the fake CA serving on
/// loopback; the client's settings pointing at both. Everything goes when dropped.
struct Setup {
    dir: PathBuf,
    fake: FakeCa,
    serving: ServingCa,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    async fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshpath-istiod-ca-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        BuiltinCa::open(Some(&dir.join("root")), TD, Duration::from_secs(3600))?;
        let root_pem = std::fs::read_to_string(dir.join("root/root-cert.pem"))?;
        let mut s = CaSettings::new(&root_pem, &std::fs::read_to_string(dir.join("root/root-key.pem"))?);
        s.tokens.insert("node-token".into(), Caller::new("istio-system", "ztunnel", "ztunnel-n1"));
        s.tokens.insert("web-token".into(), Caller::new("shop", "web", "web-1"));
        s.pods = vec![
            LabPod::new("istio-system", "ztunnel-n1", "ztunnel", "n1"),
            LabPod::new("shop", "web-1", "web", "n1"),
            LabPod::new("shop", "db-1", "db", "n2"),
        ];
        let fake = FakeCa::new(s)?;
        let serving = fake.serve("127.0.0.1:0".parse()?).await?;
        std::fs::write(dir.join("root-cert.pem"), &root_pem)?;
        std::fs::write(dir.join("istio-token"), "node-token")?;
        Ok(Self { dir, fake, serving })
    }

    /// The client's settings, as the chart would give them (24 h certificates).
    fn args(&self) -> IstiodCaArgs {
        IstiodCaArgs {
            address: format!("https://{}", self.serving.addr),
            hostname: Some(SERVING_NAMES[0].into()),
            cluster_id: "Kubernetes".into(),
            token: self.dir.join("istio-token"),
            root: self.dir.join("root-cert.pem"),
            ttl: Duration::from_secs(24 * 3600),
        }
    }

    fn client(&self) -> Result<IstiodCa> {
        Ok(IstiodCa::new(self.args())?)
    }

    fn token(&self, token: &str) -> Result<()> {
        Ok(std::fs::write(self.dir.join("istio-token"), token)?)
    }

    fn last(&self) -> Result<CsrRecord> {
        self.fake.records().pop().context("the fake recorded no call")
    }
}

/// The error is istiod's refusal `code` with `message`, and says so.
fn refused(got: Result<WorkloadCertificate, IdentityError>, code: Code, message: &str) -> Result<()> {
    let err = match got {
        Err(e) => e,
        Ok(c) => bail!("issued {} instead of a refusal", c.serial()),
    };
    let IdentityError::CaCall { code: c, message: m, .. } = &err else {
        bail!("refused by the client, not by the CA: {err}")
    };
    ensure!(*c == code && m == message, "refused with {c:?} {m:?}, not {code:?} {message:?}");
    ensure!(err.to_string().contains(message) && err.to_string().contains(&format!("{code:?}")), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_node_proxy_gets_the_identity_of_a_pod_on_its_node() -> Result<()> {
    let s = Setup::new().await?;
    let cert = s.client()?.fetch(&web()).await?;
    ensure!(meshpath::identity::identities_in(&cert.chain[0]).map_err(anyhow::Error::msg)? == vec![web()]);
    ensure!(cert.chain.len() == 1, "the root is not presented: {} certificates", cert.chain.len());
    let root = std::fs::read_to_string(s.dir.join("root-cert.pem"))?;
    ensure!(meshpath::identity::files::parse_certs(&root, &s.dir)? == cert.roots, "the roots are the mesh root");
    let life = cert.not_after.duration_since(cert.not_before)?;
    ensure!(life > Duration::from_secs(24 * 3600 - 2) && life <= Duration::from_secs(24 * 3600), "lifetime {life:?}");
    let r = s.last()?;
    ensure!(r.code == Code::Ok, "{r:?}");
    ensure!(r.caller.as_deref() == Some("istio-system/ztunnel"), "{r:?}");
    ensure!(r.asked == vec![web().to_string()] && r.impersonated == Some(web().to_string()), "{r:?}");
    ensure!(r.issued == Some(web().to_string()) && r.validity_duration == 24 * 3600, "{r:?}");
    ensure!(
        r.serial.as_deref() == Some(cert.serial().as_str()),
        "the fake issued {:?}, the client holds {}",
        r.serial,
        cert.serial()
    );
    Ok(())
}

#[tokio::test]
async fn impersonating_an_identity_with_no_pod_on_the_callers_node_is_refused() -> Result<()> {
    let s = Setup::new().await?;
    refused(s.client()?.fetch(&db()).await, Code::Unauthenticated, IMPERSONATION_FAILURE)?;
    let r = s.last()?;
    ensure!(r.reason.contains("no instances of \"shop/db\" found on node \"n1\"") && r.serial.is_none(), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn only_a_trusted_node_account_may_impersonate() -> Result<()> {
    let s = Setup::new().await?;
    s.token("web-token")?;
    // Even its own identity: a workload never asks with ImpersonatedIdentity.
    refused(s.client()?.fetch(&web()).await, Code::Unauthenticated, IMPERSONATION_FAILURE)?;
    ensure!(s.last()?.reason.contains("is not allowed to impersonate"), "{:?}", s.last()?);
    // CA_TRUSTED_NODE_ACCOUNTS names the accounts.
    s.fake.set_trusted_node_accounts(vec!["shop/web".into()]);
    s.client()?.fetch(&web()).await.context("a trusted account on the pod's node")?;
    Ok(())
}

#[tokio::test]
async fn a_token_of_a_pod_that_no_longer_exists_may_not_impersonate() -> Result<()> {
    let s = Setup::new().await?;
    // The node proxy's pod was re-created: same name, another UID.
    s.fake.set_pods(vec![
        LabPod { uid: "uid-new".into(), ..LabPod::new("istio-system", "ztunnel-n1", "ztunnel", "n1") },
        LabPod::new("shop", "web-1", "web", "n1"),
    ]);
    refused(s.client()?.fetch(&web()).await, Code::Unauthenticated, IMPERSONATION_FAILURE)?;
    ensure!(s.last()?.reason.contains("UID does not match"), "{:?}", s.last()?);
    Ok(())
}

#[tokio::test]
async fn an_unknown_token_or_another_cluster_is_not_authenticated() -> Result<()> {
    let s = Setup::new().await?;
    s.token("forged")?;
    refused(s.client()?.fetch(&web()).await, Code::Unauthenticated, AUTHENTICATE_FAILURE)?;
    ensure!(s.last()?.caller.is_none(), "{:?}", s.last()?);
    s.token("node-token")?;
    let other = IstiodCa::new(IstiodCaArgs { cluster_id: "other".into(), ..s.args() })?;
    refused(other.fetch(&web()).await, Code::Unauthenticated, AUTHENTICATE_FAILURE)?;
    ensure!(s.last()?.reason.contains("cluster other"), "{:?}", s.last()?);
    Ok(())
}

#[tokio::test]
async fn a_missing_or_empty_token_file_is_a_clear_error_and_nothing_is_sent() -> Result<()> {
    let s = Setup::new().await?;
    std::fs::remove_file(s.dir.join("istio-token"))?;
    let err = s.client()?.fetch(&web()).await.err().context("fetched without a token")?;
    ensure!(matches!(err, IdentityError::Token { .. }), "{err}");
    ensure!(err.to_string().contains("istio-token") && err.to_string().contains("No such file"), "{err}");
    s.token("\n")?;
    let err = s.client()?.fetch(&web()).await.err().context("fetched with an empty token")?;
    ensure!(err.to_string().contains("istio-token: the file is empty"), "{err}");
    ensure!(s.fake.records().is_empty(), "no call without a token");
    Ok(())
}

#[tokio::test]
async fn the_token_is_read_again_for_every_request() -> Result<()> {
    let s = Setup::new().await?;
    let client = s.client()?;
    client.fetch(&web()).await?;
    s.token("forged")?;
    refused(client.fetch(&web()).await, Code::Unauthenticated, AUTHENTICATE_FAILURE)?;
    s.token("node-token\n")?;
    client.fetch(&web()).await.context("the rotated token back in place")?;
    let codes: Vec<Code> = s.fake.records().iter().map(|r| r.code).collect();
    ensure!(codes == [Code::Ok, Code::Unauthenticated, Code::Ok], "{codes:?}");
    Ok(())
}

#[tokio::test]
async fn without_impersonation_istiod_issues_the_callers_own_identity_and_the_client_refuses_it() -> Result<()> {
    let s = Setup::new().await?;
    // A raw call: the web pod's token, a CSR for db, no ImpersonatedIdentity.
    let (pem, key) = csr(&db())?;
    let root = std::fs::read(s.dir.join("root-cert.pem"))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&root))
        .domain_name(SERVING_NAMES[0]);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", s.serving.addr))?
        .tls_config(tls)?
        .connect()
        .await?;
    let mut req = tonic::Request::new(IstioCertificateRequest { csr: pem, validity_duration: 3600, metadata: None });
    req.metadata_mut().insert("authorization", "Bearer web-token".parse()?);
    let answer = IstioCertificateServiceClient::new(channel).create_certificate(req).await?.into_inner();
    let r = s.last()?;
    ensure!(r.asked == vec![db().to_string()] && r.issued == Some(web().to_string()), "{r:?}");
    let roots = meshpath::identity::files::parse_certs(&String::from_utf8_lossy(&root), &s.dir)?;
    let err = accept(&db(), &answer.cert_chain, key, roots, SystemTime::now())
        .err()
        .context("accepted a leaf for web as db")?;
    ensure!(matches!(&err, IdentityError::WrongSan { found, .. } if *found == [web().to_string()]), "{err}");
    Ok(())
}

/// Whether an error is of the kind expected.
type IsError = fn(&IdentityError) -> bool;

#[tokio::test]
async fn wrong_answers_are_refused_by_the_client() -> Result<()> {
    let s = Setup::new().await?;
    let client = s.client()?;
    let cases: [(Fault, IsError, &str); 5] = [
        (Fault::WrongSan, |e| matches!(e, IdentityError::WrongSan { .. }), "not spiffe://cluster.local/ns/shop/sa/web"),
        (Fault::Expired, |e| matches!(e, IdentityError::Expired { .. }), "expired"),
        (Fault::NotYetValid, |e| matches!(e, IdentityError::NotYetValid { .. }), "not valid yet"),
        (Fault::UnrelatedRoot, |e| matches!(e, IdentityError::Untrusted { .. }), "does not chain to the mesh root"),
        (Fault::Empty, |e| matches!(e, IdentityError::EmptyAnswer { .. }), "no certificate"),
    ];
    for (fault, is, says) in cases {
        s.fake.set_fault(Some(fault));
        let err = client.fetch(&web()).await.err().with_context(|| format!("{fault:?} accepted"))?;
        ensure!(is(&err) && err.to_string().contains(says), "{fault:?}: {err}");
        ensure!(s.last()?.code == Code::Ok, "the fake answered {fault:?}");
    }
    s.fake.set_fault(None);
    client.fetch(&web()).await.context("a right answer after the wrong ones")?;
    Ok(())
}

#[tokio::test]
async fn istiod_is_verified_against_the_mesh_root() -> Result<()> {
    let s = Setup::new().await?;
    let other = BuiltinCa::open(Some(&s.dir.join("other")), TD, Duration::from_secs(3600))?;
    std::fs::copy(s.dir.join("other/root-cert.pem"), s.dir.join("root-cert.pem"))?;
    let client = s.client()?;
    let err = client.fetch(&web()).await.err().context("trusted a CA the mesh root did not sign")?;
    ensure!(matches!(err, IdentityError::CaCall { code: Code::Unavailable, .. }), "{err}");
    ensure!(err.to_string().contains("invalid peer certificate"), "{err}");
    ensure!(s.fake.records().is_empty(), "the request must not reach a server that failed verification");
    drop(other);
    // The root file is read again: with the mesh root back in place, the same client works.
    std::fs::copy(s.dir.join("root/root-cert.pem"), s.dir.join("root-cert.pem"))?;
    client.fetch(&web()).await.context("after the root file changed")?;
    Ok(())
}

#[tokio::test]
async fn istiod_unreachable_or_a_lifetime_above_its_maximum_is_a_clear_error() -> Result<()> {
    let s = Setup::new().await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let down = IstiodCa::new(IstiodCaArgs { address: format!("https://{closed}"), ..s.args() })?;
    let err = down.fetch(&web()).await.err().context("fetched from a closed port")?;
    ensure!(matches!(err, IdentityError::CaCall { code: Code::Unavailable, .. }), "{err}");
    ensure!(err.to_string().contains(&closed.to_string()) && err.to_string().contains("Connection refused"), "{err}");
    let long = IstiodCa::new(IstiodCaArgs { ttl: Duration::from_secs(91 * 24 * 3600), ..s.args() })?;
    let err = long.fetch(&web()).await.err().context("a 91-day certificate issued")?;
    ensure!(
        matches!(&err, IdentityError::CaCall { code: Code::InvalidArgument, message, .. } if message.contains("max allowed TTL")),
        "{err}"
    );
    Ok(())
}

/// Short-lived certificates: renewed at half life; while renewals fail the old one is served
/// until it expires, then none.
#[tokio::test]
async fn renewal_at_half_life_and_the_old_certificate_kept_while_renewals_fail() -> Result<()> {
    let s = Setup::new().await?;
    // Long enough for a loaded machine: renewal at ~3 s, 3 s more before the expiry.
    let ttl = Duration::from_secs(6);
    let m = CertificateManager::new(Box::new(IstiodCa::new(IstiodCaArgs { ttl, ..s.args() })?));
    let (stop, watcher) = meshpath::drain::new();
    let renewals = tokio::spawn(m.clone().run_renewals(watcher));
    let first = m.get(&web()).await?;
    let second = wait_for("a renewal", Duration::from_secs(6), || async {
        let c = m.get(&web()).await?;
        Ok((c.serial() != first.serial()).then_some(c))
    })
    .await?;
    ensure!(SystemTime::now() < first.not_after, "renewed before the first certificate expired");
    let serials: Vec<_> = s.fake.records().iter().filter_map(|r| r.serial.clone()).collect();
    ensure!(serials.contains(&first.serial()) && serials.contains(&second.serial()), "{serials:?}");

    s.fake.set_fault(Some(Fault::Refuse(Code::Unavailable)));
    wait_for("a failed renewal", Duration::from_secs(6), || async {
        Ok(s.fake.records().iter().any(|r| r.code == Code::Unavailable).then_some(()))
    })
    .await?;
    ensure!(SystemTime::now() < second.not_after, "the failure came after the expiry");
    ensure!(Arc::ptr_eq(&m.get(&web()).await?, &second), "the valid certificate must be kept while renewals fail");
    tokio::time::sleep(
        second.not_after.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(500),
    )
    .await;
    let err = m.get(&web()).await.err().context("an expired certificate was served")?;
    ensure!(err.to_string().contains("Unavailable"), "{err}");
    stop.start(meshpath::drain::Mode::Immediate);
    renewals.await?;
    Ok(())
}

/// Polls `f` every 100 ms until it gives a value, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no {what} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
