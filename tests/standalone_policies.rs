//! Standalone authorization end to end in the lab: the daemons follow the lab's API server,
//! which holds Istio's `AuthorizationPolicy` and `PeerAuthentication` objects; meshpath
//! translates them itself (as istiod would) and enforces them at the destination. Node 2
//! runs with `--inbound-plaintext strict` (the mesh-wide default a PeerAuthentication may
//! override), node 1 with the default, permissive.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath::record::{ConnectionRecord, Outcome};
use meshpath_lab::apiserver::Kind;
use meshpath_lab::smoke::{self, APP_PORT};
use meshpath_lab::{Lab, traffic};
use serde_json::{Value, json};

mod support;
use support::{built_lab, closed, hold, send, wait_until};

const WAIT: Duration = Duration::from_secs(10);
const CONNECT: Duration = Duration::from_secs(5);

fn k8s_lab() -> Result<Lab> {
    let mut lab = built_lab()?;
    lab.start_cluster()?;
    lab.start_daemons().context("starting the daemons in Kubernetes mode")?;
    Ok(lab)
}

fn object(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

fn apply(lab: &Lab, obj: Value) -> Result<()> {
    lab.cluster().api.apply_value(obj).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn delete(lab: &Lab, kind: Kind, namespace: &str, name: &str) -> Result<()> {
    lab.cluster().api.delete(kind, Some(namespace), name).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn passes(lab: &Lab, from: &str, to: &str) -> bool {
    send(lab, from, to, CONNECT).is_ok_and(|x| x.echoed_intact)
}

/// Waits until `from -> to` passes (or, with `pass` false, fails), as a change reaches the
/// nodes.
fn expect(lab: &Lab, from: &str, to: &str, pass: bool) -> Result<()> {
    let what = format!("{from} -> {to} to {}", if pass { "pass" } else { "be refused" });
    wait_until(&what, WAIT, || Ok(passes(lab, from, to) == pass))
}

fn record(lab: &Lab, node: usize, pred: impl Fn(&ConnectionRecord) -> bool) -> Result<ConnectionRecord> {
    support::record(lab, node, WAIT, pred)
}

/// PeerAuthentication: the node's default, a namespace's mode over it, a workload's over
/// that; and the plaintext refusal recorded as before policies existed.
#[test]
fn peer_authentication_sets_the_plaintext_mode_per_namespace_and_workload() -> Result<()> {
    let lab = k8s_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    // Node 2's default (strict) refuses d -> c; node 1's (permissive) lets d -> a through.
    expect(&lab, "d", "a", true)?;
    ensure!(!passes(&lab, "d", "c"), "d -> c passed node 2's strict default");
    let c = lab.pod("c").v4;
    record(&lab, 1, |r| r.orig_dst.ip() == c && r.outcome == Outcome::PlaintextRefused)?;

    // The namespace says PERMISSIVE: it wins over the node's mesh-wide default.
    apply(&lab, object("PeerAuthentication", "lab", "lab-permissive", json!({"mtls": {"mode": "PERMISSIVE"}})))?;
    expect(&lab, "d", "c", true)?;
    // Pod a says STRICT (a workload selector): it wins over its namespace.
    let strict_a = json!({"selector": {"matchLabels": {"app": "a"}}, "mtls": {"mode": "STRICT"}});
    apply(&lab, object("PeerAuthentication", "lab", "a-strict", strict_a))?;
    // Refused by the proxy, as its record says (a failure alone could be a slow machine's).
    let a = lab.pod("a").v4;
    let refused_at_a = |r: &ConnectionRecord| r.orig_dst.ip() == a && r.outcome == Outcome::PlaintextRefused;
    wait_until("d -> a refused as plaintext by node 1", WAIT, || {
        Ok(!passes(&lab, "d", "a") && lab.records(0)?.iter().any(refused_at_a))
    })?;
    ensure!(passes(&lab, "d", "c"), "d -> c refused while its namespace is permissive");
    // HBONE is not plaintext: a -> c and c -> a pass whatever the mode.
    ensure!(passes(&lab, "c", "a") && passes(&lab, "a", "c"), "mTLS refused by a plaintext mode");
    // Without them, the nodes' defaults again; then a mesh-wide STRICT (root namespace, no
    // selector) overrides node 1's permissive default.
    delete(&lab, Kind::PeerAuthentication, "lab", "lab-permissive")?;
    delete(&lab, Kind::PeerAuthentication, "lab", "a-strict")?;
    expect(&lab, "d", "a", true)?;
    expect(&lab, "d", "c", false)?;
    apply(&lab, object("PeerAuthentication", "istio-system", "default", json!({"mtls": {"mode": "STRICT"}})))?;
    expect(&lab, "d", "a", false)?;
    Ok(())
}

/// AuthorizationPolicy objects: a selector policy decides for its pod only (IPv4 and IPv6,
/// across a takeover), an open HBONE stream and a plain relay it now denies are closed, a pod newly labelled into a policy
/// has its open connections closed too (ztunnel leaves those open), a malformed object
/// fails closed with one line, and removing the policies lets connections through again.
#[test]
fn authorization_policies_from_kubernetes_decide_and_close_what_they_deny() -> Result<()> {
    let mut lab = k8s_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let streaming = APP_PORT + 2000;
    let _echo_c = traffic::EchoServer::start_streaming(&lab.pod("c").netns, streaming)?;
    let _echo_a = traffic::EchoServer::start_streaming(&lab.pod("a").netns, streaming)?;
    expect(&lab, "a", "c", true)?;
    let mut stream = hold(&lab, "a", lab.addr("c", false, streaming), WAIT)?;
    let mut relay = hold(&lab, "d", lab.addr("a", true, streaming), WAIT)?;

    // Only e's service account may reach c (by principal, as users write it).
    let only_e = json!({
        "selector": {"matchLabels": {"app": "c"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/lab/sa/sa-e"]}}]}],
    });
    apply(&lab, object("AuthorizationPolicy", "lab", "c-from-e", only_e))?;
    ensure!(closed(&mut stream), "the open a -> c stream outlived the policy that denies it");
    expect(&lab, "a", "c", false)?;
    ensure!(passes(&lab, "e", "c"), "e -> c refused: the policy allows sa-e");
    ensure!(passes(&lab, "c", "a"), "c -> a refused: the policy selects c only");
    let denied = |r: &ConnectionRecord| {
        r.outcome == Outcome::PolicyDenied
            && r.error.as_deref().is_some_and(|e| e.contains("allow policies exist, but none allowed"))
    };
    let c_stream = lab.addr("c", false, streaming);
    record(&lab, 1, |r| r.listener == "hbone" && r.orig_dst == c_stream && denied(r))?;
    // Over IPv6 too, and across a takeover of c's node: the successor serves only once its
    // policies are listed, so it enforces them from its first connection.
    let c6 = lab.addr("c", true, APP_PORT);
    let reach_c6 = |lab: &Lab| {
        traffic::exchange(&lab.pod("a").netns, None, c6, &traffic::payload(64), CONNECT).is_ok_and(|x| x.echoed_intact)
    };
    ensure!(!reach_c6(&lab), "a reached c over IPv6 through the policy");
    lab.take_over(1, Duration::from_secs(30))?;
    ensure!(!reach_c6(&lab), "a reached c through node 2's successor");
    ensure!(passes(&lab, "e", "c"), "e -> c refused by node 2's successor");

    // A policy whose selector matches nothing yet; then pod a is labelled into it: the
    // plain relay d -> a, open all along, is closed (a workload gaining a policy).
    let no_plain = json!({
        "selector": {"matchLabels": {"tier": "guarded"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}],
    });
    apply(&lab, object("AuthorizationPolicy", "lab", "guarded-no-plaintext", no_plain))?;
    ensure!(passes(&lab, "d", "a"), "d -> a refused before a carries the label");
    let mut pod_a = lab.pod_object("a");
    pod_a.metadata.labels.get_or_insert_default().insert("tier".into(), "guarded".into());
    lab.cluster().api.apply(&pod_a).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(closed(&mut relay), "the plain relay to a stayed open once a was labelled into a DENY policy");
    let a_stream = lab.addr("a", true, streaming);
    record(&lab, 0, |r| {
        r.orig_dst == a_stream
            && r.outcome == Outcome::PolicyDenied
            && r.error.as_deref().is_some_and(|e| e.contains("lab/guarded-no-plaintext"))
    })?;

    // A malformed DENY (an address that is none) fails closed for its scope: nothing
    // reaches e, and the node says so once.
    let broken = json!({
        "selector": {"matchLabels": {"app": "e"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"ipBlocks": ["not-an-address"]}}]}],
    });
    apply(&lab, object("AuthorizationPolicy", "lab", "broken", broken))?;
    expect(&lab, "a", "e", false)?;
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    let said = log.lines().filter(|l| l.contains("lab/broken") && l.contains("refused")).count();
    ensure!(said == 1, "node 1 said {said} lines of lab/broken, want 1:\n{log}");
    ensure!(passes(&lab, "a", "b"), "a -> b refused by e's broken policy");

    for name in ["c-from-e", "guarded-no-plaintext", "broken"] {
        delete(&lab, Kind::AuthorizationPolicy, "lab", name)?;
    }
    expect(&lab, "a", "c", true)?;
    expect(&lab, "a", "e", true)?;
    expect(&lab, "d", "a", true)?;
    Ok(())
}

/// A cluster without Istio's CRDs (the common standalone case): the daemons start and
/// serve, saying once per kind that there are none; once the CRDs come, their objects are
/// enforced (the watch keeps looking, with backoff).
#[test]
fn without_istios_crds_the_daemons_serve_and_pick_the_crds_up_later() -> Result<()> {
    let mut lab = built_lab()?;
    lab.start_cluster()?;
    let api = lab.cluster().api.clone();
    for kind in [Kind::AuthorizationPolicy, Kind::PeerAuthentication] {
        api.set_installed(kind, false);
    }
    lab.start_daemons().context("starting the daemons without Istio's CRDs")?;
    let _servers = smoke::start_servers(&lab)?;
    expect(&lab, "a", "c", true)?;
    // Several retries have passed by now: still one line per kind.
    std::thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    for kind in ["authorizationpolicies", "peerauthentications"] {
        let said = log.lines().filter(|l| l.contains("not installed") && l.contains(kind)).count();
        ensure!(said == 1, "node 1 said {said} lines of {kind} not being installed, want 1:\n{log}");
    }
    for kind in [Kind::AuthorizationPolicy, Kind::PeerAuthentication] {
        api.set_installed(kind, true);
    }
    let deny_all = json!({"selector": {"matchLabels": {"app": "c"}}, "action": "DENY", "rules": [{}]});
    apply(&lab, object("AuthorizationPolicy", "lab", "c-closed", deny_all))?;
    // kube-rs's default backoff tops out at 30 s between attempts.
    wait_until("a -> c to be refused once the CRD exists", Duration::from_secs(45), || Ok(!passes(&lab, "a", "c")))?;
    record(&lab, 1, |r| {
        r.outcome == Outcome::PolicyDenied && r.error.as_deref().is_some_and(|e| e.contains("lab/c-closed"))
    })?;
    Ok(())
}
