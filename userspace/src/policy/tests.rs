//! ztunnel's authorization tests (`rbac.rs`, `state.rs`, `state/policy.rs`), each case
//! re-expressed with other names and values, plus the edges ztunnel's tests leave implicit.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::SocketAddr;

use ipnet::IpNet;

use super::*;
use crate::identity::Identity;
use crate::xds::proto::istio::security as wire;

/// A connection as the destination's proxy knows it (shared with the translation's tests).
#[derive(Debug)]
pub(super) struct Conn {
    identity: Option<Identity>,
    src: SocketAddr,
    dst: SocketAddr,
}

impl Conn {
    pub(super) fn new(identity: Option<Identity>, src: &str, dst: &str) -> Self {
        Self { identity, src: src.parse().expect("src"), dst: dst.parse().expect("dst") }
    }

    pub(super) fn facts(&self) -> ConnectionFacts<'_> {
        ConnectionFacts {
            source_identity: self.identity.as_ref(),
            source_ip: self.src.ip(),
            destination_ip: self.dst.ip(),
            destination_port: self.dst.port(),
        }
    }
}

fn id(td: &str, ns: &str, sa: &str) -> Option<Identity> {
    Some(Identity::new(td, ns, sa))
}

fn plaintext() -> Conn {
    Conn::new(None, "10.1.0.5:40000", "10.2.0.7:8080")
}

fn mtls() -> Conn {
    Conn::new(id("cluster.local", "shop", "web"), "10.1.0.5:40000", "10.2.0.7:8080")
}

fn mtls_other() -> Conn {
    Conn::new(id("bank.example", "bank", "teller"), "10.9.0.3:40000", "10.2.0.8:9090")
}

/// A connection from `ns`/`sa` (trust domain cluster.local) to port `port`.
fn from(ns: &str, sa: &str, port: u16) -> Conn {
    Conn::new(id("cluster.local", ns, sa), "10.1.0.5:40000", &format!("10.2.0.7:{port}"))
}

fn policy(key: &str, scope: Scope, action: Action, rules: Vec<Rule>) -> Policy {
    let (ns, name) = key.split_once('/').expect("ns/name");
    Policy::new(ns, name, scope, action, rules, false).expect("valid policy")
}

fn dry(key: &str, action: Action, rules: Vec<Rule>) -> Policy {
    let (ns, name) = key.split_once('/').expect("ns/name");
    Policy::new(ns, name, Scope::Namespace, action, rules, true).expect("valid policy")
}

/// One rule of one clause of one Match.
fn only(m: Match) -> Vec<Rule> {
    vec![vec![vec![m]]]
}

/// A rule that matches every connection (one empty clause).
fn everything() -> Vec<Rule> {
    vec![vec![vec![]]]
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn net(s: &str) -> IpNet {
    s.parse().expect("cidr")
}

fn principals(list: Vec<StringMatch>) -> Match {
    Match { principals: list, ..Default::default() }
}

/// Whether `p`, an ALLOW policy alone, lets `conn` through: exactly when it matches.
fn allows(p: &Policy, conn: &Conn) -> bool {
    decide(std::iter::once(p), &conn.facts()).decision == Decision::Allow
}

fn denied_by(key: &str) -> Decision {
    Decision::Deny { code: DenyCode::ExplicitlyDenied, policy: Some(key.into()) }
}

fn not_allowed() -> Decision {
    Decision::Deny { code: DenyCode::NotAllowed, policy: None }
}

fn dest<'a>(namespace: &'a str, keys: &'a [String]) -> DestinationView<'a> {
    DestinationView { namespace, policy_keys: keys }
}

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|k| (*k).to_owned()).collect()
}

// rbac.rs `rbac_empty_policy`: the shapes of emptiness.
#[test]
fn an_empty_match_never_matches_an_empty_clause_or_rule_always_does_no_rules_never() {
    let allow = |rules| policy("shop/p", Scope::Global, Action::Allow, rules);
    for conn in [plaintext(), mtls()] {
        assert!(!allows(&allow(only(Match::default())), &conn), "{conn:?}");
        assert!(allows(&allow(vec![vec![vec![]]]), &conn), "{conn:?}");
        assert!(allows(&allow(vec![vec![]]), &conn), "{conn:?}");
        assert!(!allows(&allow(vec![]), &conn), "{conn:?}");
    }
    // An empty Match beside one that matches: the clause still matches (OR).
    let port = Match { destination_ports: vec![8080], ..Default::default() };
    assert!(allows(&allow(vec![vec![vec![Match::default(), port]]]), &mtls()));
}

// rbac.rs `rbac_nesting`: a clause's Matches OR-ed, a rule's clauses AND-ed.
#[test]
fn clauses_are_and_ed_and_matches_in_a_clause_or_ed() {
    let ns = |n: &str| Match { namespaces: vec![exact(n)], ..Default::default() };
    let port = Match { destination_ports: vec![443], ..Default::default() };
    let p = policy("shop/nested", Scope::Global, Action::Allow, vec![vec![vec![ns("red"), ns("blue")], vec![port]]]);
    assert!(allows(&p, &from("red", "any", 443)));
    assert!(allows(&p, &from("blue", "any", 443)));
    assert!(!allows(&p, &from("green", "any", 443)), "wrong namespace");
    assert!(!allows(&p, &from("blue", "any", 8443)), "wrong port");
}

// rbac.rs `rbac_multi_rule`: rules OR-ed.
#[test]
fn any_rule_matching_matches_the_policy() {
    let rule = |n: &str| vec![vec![Match { namespaces: vec![exact(n)], ..Default::default() }]];
    let p = policy("shop/multi", Scope::Global, Action::Allow, vec![rule("red"), rule("blue")]);
    assert!(allows(&p, &from("red", "any", 80)));
    assert!(allows(&p, &from("blue", "any", 80)));
    assert!(!allows(&p, &from("green", "any", 80)));
}

// Hostile: one policy of thousands of rules decides by its last one, and by none.
#[test]
fn a_policy_of_thousands_of_rules_is_decided_by_any_of_them() {
    let rule = |n: String| vec![vec![Match { namespaces: vec![StringMatch::Exact(n)], ..Default::default() }]];
    let mut rules: Vec<Rule> = (0..5_000).map(|i| rule(format!("ns-{i}"))).collect();
    let p = policy("shop/huge", Scope::Global, Action::Allow, rules.clone());
    assert!(!allows(&p, &from("shop", "web", 80)));
    assert!(allows(&p, &from("ns-4999", "any", 80)));
    rules.push(rule("shop".into()));
    assert!(allows(&policy("shop/huge", Scope::Global, Action::Allow, rules), &from("shop", "web", 80)));
}

// rbac.rs `rbac_test!` cases: each kind and its `not_*`, over plaintext and two identities.
#[test]
fn each_match_kind_and_its_negation() {
    let web = ServiceAccountMatch { namespace: "shop".into(), service_account: "web".into() };
    let m = Match::default;
    let cases: Vec<(&str, Match, [bool; 3])> = vec![
        ("namespaces", Match { namespaces: vec![exact("shop")], ..m() }, [false, true, false]),
        ("not_namespaces", Match { not_namespaces: vec![exact("shop")], ..m() }, [true, false, true]),
        ("service_accounts", Match { service_accounts: vec![web.clone()], ..m() }, [false, true, false]),
        ("not_service_accounts", Match { not_service_accounts: vec![web], ..m() }, [true, false, true]),
        ("principals", principals(vec![exact("cluster.local/ns/shop/sa/web")]), [false, true, false]),
        (
            "not_principals",
            Match { not_principals: vec![exact("cluster.local/ns/shop/sa/web")], ..m() },
            [true, false, true],
        ),
        ("source_ips", Match { source_ips: vec![net("10.1.0.5/32")], ..m() }, [true, true, false]),
        ("not_source_ips", Match { not_source_ips: vec![net("10.1.0.5/32")], ..m() }, [false, false, true]),
        ("destination_ips", Match { destination_ips: vec![net("10.2.0.7/32")], ..m() }, [true, true, false]),
        ("not_destination_ips", Match { not_destination_ips: vec![net("10.2.0.7/32")], ..m() }, [false, false, true]),
        // A block written with host bits set still means its network (ztunnel's `cidr_range`).
        ("destination_ips cidr", Match { destination_ips: vec![net("10.2.0.1/24")], ..m() }, [true, true, true]),
        ("destination_ports", Match { destination_ports: vec![8080], ..m() }, [true, true, false]),
        ("not_destination_ports", Match { not_destination_ports: vec![8080], ..m() }, [false, false, true]),
    ];
    for (label, m, expected) in cases {
        let p = policy("shop/kind", Scope::Global, Action::Allow, only(m));
        for (conn, want) in [plaintext(), mtls(), mtls_other()].iter().zip(expected) {
            assert_eq!(allows(&p, conn), want, "{label} for {conn:?}");
        }
    }
}

// rbac.rs `string_match`.
#[test]
fn string_matches() {
    let cases = [
        (exact("api"), "api", true),
        (exact("api"), "web", false),
        (exact("api"), "", false),
        (StringMatch::Prefix("api".into()), "api-v2", true),
        (StringMatch::Prefix("api".into()), "v2-api", false),
        (StringMatch::Prefix("api".into()), "", false),
        (StringMatch::Suffix("api".into()), "v2-api", true),
        (StringMatch::Suffix("api".into()), "api-v2", false),
        (StringMatch::Suffix("api".into()), "", false),
        (StringMatch::Presence, "api", true),
        (StringMatch::Presence, "", false),
    ];
    for (m, value, want) in cases {
        assert_eq!(m.matches(value), want, "{m:?} on {value:?}");
    }
}

#[test]
fn principals_are_matched_without_spiffe_scheme_and_with_their_trust_domain() {
    let allow = |list| policy("shop/p", Scope::Global, Action::Allow, only(principals(list)));
    assert!(!allows(&allow(vec![exact("spiffe://cluster.local/ns/shop/sa/web")]), &mtls()));
    assert!(allows(&allow(vec![StringMatch::Prefix("cluster.local/ns/shop/".into())]), &mtls()));
    assert!(allows(&allow(vec![StringMatch::Suffix("/ns/shop/sa/web".into())]), &mtls()));
    // Another trust domain, same namespace and account: not the same principal...
    let foreign = Conn::new(id("evil.example", "shop", "web"), "10.1.0.5:40000", "10.2.0.7:8080");
    assert!(!allows(&allow(vec![exact("cluster.local/ns/shop/sa/web")]), &foreign));
    // ...but the same service account (which names no trust domain, as in ztunnel).
    let web = ServiceAccountMatch { namespace: "shop".into(), service_account: "web".into() };
    let by_account = policy(
        "shop/sa",
        Scope::Global,
        Action::Allow,
        only(Match { service_accounts: vec![web], ..Default::default() }),
    );
    assert!(allows(&by_account, &foreign));
}

#[test]
fn a_longer_account_name_does_not_pass_for_a_shorter_one_except_by_prefix() {
    let evil = from("shop", "web-evil", 8080);
    let allow = |m| policy("shop/p", Scope::Global, Action::Allow, only(principals(vec![m])));
    assert!(!allows(&allow(exact("cluster.local/ns/shop/sa/web")), &evil));
    assert!(!allows(&allow(StringMatch::Suffix("/sa/web".into())), &evil));
    // A prefix is a prefix: `web*` in a policy admits `web-evil`, in ztunnel as here.
    assert!(allows(&allow(StringMatch::Prefix("cluster.local/ns/shop/sa/web".into())), &evil));
}

#[test]
fn plaintext_has_no_principal_and_an_empty_namespace() {
    let allow = |m| policy("shop/p", Scope::Global, Action::Allow, only(m));
    assert!(!allows(&allow(principals(vec![StringMatch::Presence])), &plaintext()));
    assert!(!allows(&allow(principals(vec![StringMatch::Prefix(String::new())])), &plaintext()));
    assert!(allows(&allow(Match { not_principals: vec![StringMatch::Presence], ..Default::default() }), &plaintext()));
    assert!(!allows(&allow(Match { namespaces: vec![StringMatch::Presence], ..Default::default() }), &plaintext()));
    assert!(allows(&allow(Match { not_namespaces: vec![StringMatch::Presence], ..Default::default() }), &plaintext()));
}

#[test]
fn ipv6_blocks_and_ipv4_mapped_sources() {
    let v6 = Conn::new(id("cluster.local", "shop", "web"), "[2001:db8:1::5]:40000", "[2001:db8:9::7]:8080");
    let other6 = Conn::new(None, "[2001:db8:2::5]:40000", "[2001:db8:9::8]:8080");
    let mapped = Conn::new(None, "[::ffff:10.1.0.5]:40000", "10.2.0.7:8080");
    let allow = |m| policy("shop/p", Scope::Global, Action::Allow, only(m));
    let src = allow(Match { source_ips: vec![net("2001:db8:1::/48")], ..Default::default() });
    assert!(allows(&src, &v6));
    assert!(!allows(&src, &other6));
    assert!(!allows(&src, &mtls()), "a v6 block never holds a v4 address");
    let dst = allow(Match { not_destination_ips: vec![net("2001:db8:9::7/128")], ..Default::default() });
    assert!(!allows(&dst, &v6));
    assert!(allows(&dst, &other6));
    let v4 = allow(Match { source_ips: vec![net("10.1.0.0/16")], ..Default::default() });
    assert!(allows(&v4, &mapped), "an IPv4-mapped source is its IPv4 address");
}

/// state.rs `assert_rbac_logic_deny_allow`, on a store: namespace policies of `ns1` and
/// dry-run wildcards that must not decide.
fn precedence_store() -> PolicyStore {
    let principal = |sa: &str| only(principals(vec![exact(&format!("cluster.local/ns/default/sa/{sa}"))]));
    let mut store = PolicyStore::default();
    store.insert(dry("ns1/wildcard-allow", Action::Allow, everything()));
    store.insert(dry("ns1/wildcard-deny", Action::Deny, everything()));
    store.insert(policy("ns1/allow-app", Scope::Namespace, Action::Allow, principal("app")));
    store.insert(policy("ns1/deny-bad", Scope::Namespace, Action::Deny, principal("bad")));
    store
}

#[test]
fn deny_first_then_no_allow_allows_then_a_matching_allow_then_deny() {
    let store = precedence_store();
    let none = keys(&[]);
    let verdict = |sa: &str, ns: &str| store.evaluate(&from("default", sa, 8080).facts(), dest(ns, &none));
    // No policy in ns2: allowed.
    let v = verdict("stranger", "ns2");
    assert_eq!((v.decision, v.allowed_by, v.dry_run), (Decision::Allow, None, vec![]));
    // A matching ALLOW.
    let v = verdict("app", "ns1");
    assert_eq!((v.decision, v.allowed_by.as_deref()), (Decision::Allow, Some("ns1/allow-app")));
    // ALLOW policies, none matching.
    let v = verdict("stranger", "ns1").decision;
    assert_eq!(v, not_allowed());
    assert_eq!(v.to_string(), "allow policies exist, but none allowed");
    // A matching DENY.
    let v = verdict("bad", "ns1").decision;
    assert_eq!(v, denied_by("ns1/deny-bad"));
    assert_eq!(v.to_string(), "explicitly denied by: ns1/deny-bad");
}

#[test]
fn deny_wins_over_a_matching_allow() {
    let mut store = PolicyStore::default();
    store.insert(policy("shop/all", Scope::Namespace, Action::Allow, everything()));
    store.insert(policy(
        "shop/no-web",
        Scope::Namespace,
        Action::Deny,
        only(principals(vec![exact("cluster.local/ns/shop/sa/web")])),
    ));
    let none = keys(&[]);
    assert_eq!(store.evaluate(&mtls().facts(), dest("shop", &none)).decision, denied_by("shop/no-web"));
    assert_eq!(store.evaluate(&mtls_other().facts(), dest("shop", &none)).decision, Decision::Allow);
}

// state.rs `assert_rbac_with_dest_workload_info`.
#[test]
fn an_empty_store_allows() {
    let v = PolicyStore::default().evaluate(&mtls().facts(), dest("shop", &[]));
    assert_eq!(v, Verdict { decision: Decision::Allow, allowed_by: None, dry_run: vec![] });
}

// state.rs `assert_rbac_dry_run_with_real_policies`.
#[test]
fn dry_run_policies_are_reported_and_never_decide() {
    let principal = |sa: &str| vec![vec![principals(vec![exact(&format!("cluster.local/ns/default/sa/{sa}"))])]];
    let mut store = PolicyStore::default();
    store.insert(policy("ns1/real-deny", Scope::Namespace, Action::Deny, vec![principal("bad")]));
    store.insert(dry("ns1/dry-deny", Action::Deny, vec![principal("app"), principal("bad")]));
    store.insert(policy("ns1/real-allow", Scope::Namespace, Action::Allow, vec![principal("app")]));
    store.insert(dry("ns1/dry-allow", Action::Allow, vec![principal("app")]));
    let none = keys(&[]);
    let v = store.evaluate(&from("default", "app", 8080).facts(), dest("ns1", &none));
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(v.dry_run, vec![DryRun::Deny("ns1/dry-deny".into()), DryRun::Allow("ns1/dry-allow".into())]);
    assert_eq!(v.dry_run[0].to_string(), "dry-run: deny policy match: ns1/dry-deny");
    // Denied by the real one: dry-run DENYs are still reported, dry-run ALLOWs not reached.
    let v = store.evaluate(&from("default", "bad", 8080).facts(), dest("ns1", &none));
    assert_eq!(v.decision, denied_by("ns1/real-deny"));
    assert_eq!(v.dry_run, vec![DryRun::Deny("ns1/dry-deny".into())]);
}

#[test]
fn dry_run_allows_alone_that_do_not_match_are_noted_and_allow() {
    let mut store = PolicyStore::default();
    store.insert(dry(
        "shop/only-bank",
        Action::Allow,
        only(Match { namespaces: vec![exact("bank")], ..Default::default() }),
    ));
    let v = store.evaluate(&mtls().facts(), dest("shop", &[]));
    assert_eq!((v.decision, v.dry_run), (Decision::Allow, vec![DryRun::NoAllowMatched]));
    let v = store.evaluate(&mtls_other().facts(), dest("shop", &[]));
    assert_eq!((v.decision, v.dry_run), (Decision::Allow, vec![DryRun::Allow("shop/only-bank".into())]));
}

fn candidate_keys(store: &PolicyStore, view: DestinationView<'_>) -> Vec<String> {
    store.candidates(view).map(|p| p.key().to_owned()).collect()
}

#[test]
fn scopes_select_global_namespace_and_named_policies() {
    let mut store = PolicyStore::default();
    store.insert(policy("istio-system/mesh", Scope::Global, Action::Allow, everything()));
    store.insert(policy("shop/ns", Scope::Namespace, Action::Allow, everything()));
    store.insert(policy("bank/ns", Scope::Namespace, Action::Allow, everything()));
    store.insert(policy("shop/db-only", Scope::WorkloadSelector, Action::Allow, everything()));
    store.insert(policy("bank/teller-only", Scope::WorkloadSelector, Action::Allow, everything()));
    assert_eq!(candidate_keys(&store, dest("shop", &[])), ["shop/ns", "istio-system/mesh"]);
    assert_eq!(candidate_keys(&store, dest("empty", &[])), ["istio-system/mesh"]);
    let named = keys(&["shop/db-only"]);
    assert_eq!(candidate_keys(&store, dest("shop", &named)), ["shop/ns", "istio-system/mesh", "shop/db-only"]);
    // A key is applied whatever namespace names it (ztunnel looks keys up as they are).
    let cross = keys(&["bank/teller-only"]);
    assert_eq!(candidate_keys(&store, dest("shop", &cross)), ["shop/ns", "istio-system/mesh", "bank/teller-only"]);
    // A named key the indexes give already is consulted once.
    let again = keys(&["shop/ns", "istio-system/mesh", "bank/ns"]);
    assert_eq!(candidate_keys(&store, dest("shop", &again)), ["shop/ns", "istio-system/mesh", "bank/ns"]);
}

#[test]
fn unknown_keys_are_skipped_and_reported() {
    let mut store = PolicyStore::default();
    store.insert(policy("shop/deny-all", Scope::WorkloadSelector, Action::Deny, everything()));
    let named = keys(&["shop/not-yet", "shop/deny-all"]);
    assert_eq!(store.unknown_keys(dest("shop", &named)).collect::<Vec<_>>(), ["shop/not-yet"]);
    assert_eq!(store.evaluate(&mtls().facts(), dest("shop", &named)).decision, denied_by("shop/deny-all"));
    let unknown_only = keys(&["shop/not-yet"]);
    assert_eq!(store.evaluate(&mtls().facts(), dest("shop", &unknown_only)).decision, Decision::Allow);
}

// state/policy.rs `rbac_change_scope`, and the other deltas.
#[test]
fn replacing_and_removing_reindex() {
    let mut store = PolicyStore::default();
    assert!(store.insert(policy("shop/p", Scope::Namespace, Action::Deny, everything())).is_none());
    assert_eq!(candidate_keys(&store, dest("shop", &[])), ["shop/p"]);
    let old = store.insert(policy("shop/p", Scope::WorkloadSelector, Action::Deny, everything()));
    assert_eq!(old.map(|p| p.scope()), Some(Scope::Namespace));
    assert!(candidate_keys(&store, dest("shop", &[])).is_empty());
    let named = keys(&["shop/p"]);
    assert_eq!(candidate_keys(&store, dest("shop", &named)), ["shop/p"]);
    store.insert(policy("shop/p", Scope::Global, Action::Deny, everything()));
    assert_eq!(candidate_keys(&store, dest("bank", &[])), ["shop/p"]);
    assert_eq!(store.remove("shop/p").map(|p| p.scope()), Some(Scope::Global));
    assert!(store.remove("shop/p").is_none());
    assert!(store.is_empty() && candidate_keys(&store, dest("bank", &named)).is_empty());
}

#[test]
fn a_snapshot_does_not_see_later_changes() {
    let mut store = PolicyStore::default();
    store.insert(policy("shop/p", Scope::Namespace, Action::Deny, everything()));
    let snapshot = store.clone();
    assert!(snapshot.is_snapshot_of(&store), "an unchanged copy is the same store");
    store.remove("shop/p");
    assert!(!snapshot.is_snapshot_of(&store), "an edited one is not");
    assert_eq!(snapshot.evaluate(&mtls().facts(), dest("shop", &[])).decision, denied_by("shop/p"));
    assert_eq!(store.evaluate(&mtls().facts(), dest("shop", &[])).decision, Decision::Allow);
}

/// PeerAuthentication STRICT as istiod sends it: a DENY of any connection without principal.
#[test]
fn the_static_strict_policy_denies_plaintext_only_where_named() {
    let strict = Match { not_principals: vec![StringMatch::Presence], ..Default::default() };
    let mut store = PolicyStore::default();
    store.insert(policy(
        "istio-system/istio_converted_static_strict",
        Scope::WorkloadSelector,
        Action::Deny,
        only(strict),
    ));
    let named = keys(&["istio-system/istio_converted_static_strict"]);
    let strict_dest = dest("shop", &named);
    assert_eq!(
        store.evaluate(&plaintext().facts(), strict_dest).decision.to_string(),
        "explicitly denied by: istio-system/istio_converted_static_strict"
    );
    assert_eq!(store.evaluate(&mtls().facts(), strict_dest).decision, Decision::Allow);
    assert_eq!(store.evaluate(&plaintext().facts(), dest("shop", &[])).decision, Decision::Allow);
}

#[test]
fn evaluation_consults_only_the_policies_that_apply() {
    let mut store = PolicyStore::default();
    // 10 000 policies that would deny everything, none applying to shop's workload.
    for i in 0..10_000 {
        let scope = if i % 2 == 0 { Scope::Namespace } else { Scope::WorkloadSelector };
        store.insert(policy(&format!("other-{}/deny-{i}", i % 100), scope, Action::Deny, everything()));
    }
    let applicable = ["shop/ns", "istio-system/mesh", "shop/selected"];
    store.insert(policy(applicable[0], Scope::Namespace, Action::Allow, everything()));
    store.insert(policy(applicable[1], Scope::Global, Action::Allow, everything()));
    store.insert(policy(applicable[2], Scope::WorkloadSelector, Action::Allow, everything()));
    let named = keys(&["shop/selected"]);
    let consulted = RefCell::new(Vec::new());
    let candidates =
        store.candidates(dest("shop", &named)).inspect(|p| consulted.borrow_mut().push(p.key().to_owned()));
    let verdict = decide(candidates, &mtls().facts());
    assert_eq!(verdict.decision, Decision::Allow);
    let consulted = consulted.into_inner();
    assert_eq!(consulted.len(), 2 * applicable.len(), "two passes over the applicable ones: {consulted:?}");
    assert_eq!(consulted.into_iter().collect::<BTreeSet<_>>(), applicable.map(String::from).into());
    assert_eq!(store.evaluate(&mtls().facts(), dest("shop", &named)), verdict);
}

fn wire_match() -> wire::Match {
    use wire::string_match::MatchType;
    let s = |t: MatchType| wire::StringMatch { match_type: Some(t) };
    let addr = |a: Vec<u8>, length| wire::Address { address: a, length };
    let sa = |ns: &str, sa: &str| wire::ServiceAccountMatch { namespace: ns.into(), service_account: sa.into() };
    wire::Match {
        namespaces: vec![s(MatchType::Exact("shop".into())), s(MatchType::Presence(()))],
        not_namespaces: vec![s(MatchType::Prefix("kube-".into()))],
        principals: vec![s(MatchType::Suffix("/sa/web".into()))],
        not_principals: vec![s(MatchType::Exact("cluster.local/ns/shop/sa/old".into()))],
        source_ips: vec![addr(vec![10, 1, 0, 0], 16)],
        not_source_ips: vec![addr(vec![10, 1, 9, 9], 32)],
        destination_ips: vec![addr([0x20, 0x01, 0x0d, 0xb8].into_iter().chain([0; 12]).collect(), 32)],
        not_destination_ips: vec![addr(vec![0; 16], 0)],
        destination_ports: vec![8080, 9090],
        not_destination_ports: vec![15008],
        service_accounts: vec![sa("shop", "web")],
        not_service_accounts: vec![sa("shop", "old")],
    }
}

fn wire_policy(m: wire::Match) -> wire::Authorization {
    wire::Authorization {
        name: "p".into(),
        namespace: "shop".into(),
        scope: wire::Scope::WorkloadSelector.into(),
        action: wire::Action::Deny.into(),
        rules: vec![wire::Rule { clauses: vec![wire::Clause { matches: vec![m] }, wire::Clause::default()] }],
        dry_run: true,
    }
}

#[test]
fn converts_every_field_from_the_wire() {
    let p = Policy::from_resource("shop/p", wire_policy(wire_match())).expect("valid");
    let web = |sa: &str| ServiceAccountMatch { namespace: "shop".into(), service_account: sa.into() };
    let expected = Match {
        namespaces: vec![exact("shop"), StringMatch::Presence],
        not_namespaces: vec![StringMatch::Prefix("kube-".into())],
        principals: vec![StringMatch::Suffix("/sa/web".into())],
        not_principals: vec![exact("cluster.local/ns/shop/sa/old")],
        source_ips: vec![net("10.1.0.0/16")],
        not_source_ips: vec![net("10.1.9.9/32")],
        destination_ips: vec![net("2001:db8::/32")],
        not_destination_ips: vec![net("::/0")],
        destination_ports: vec![8080, 9090],
        not_destination_ports: vec![15008],
        service_accounts: vec![web("web")],
        not_service_accounts: vec![web("old")],
    };
    let want =
        Policy::new("shop", "p", Scope::WorkloadSelector, Action::Deny, vec![vec![vec![expected], vec![]]], true)
            .expect("valid");
    assert_eq!(p, want);
    assert_eq!((p.key(), p.namespace(), p.name(), p.dry_run()), ("shop/p", "shop", "p", true));
}

fn first(a: &mut wire::Authorization) -> &mut wire::Match {
    &mut a.rules[0].clauses[0].matches[0]
}

#[test]
fn malformed_resources_are_refused_whole() {
    type Edit = Box<dyn Fn(&mut wire::Authorization)>;
    let cases: Vec<(Edit, PolicyError)> = vec![
        (Box::new(|a| a.scope = 7), PolicyError::UnknownScope(7)),
        (Box::new(|a| a.action = 9), PolicyError::UnknownAction(9)),
        (Box::new(|a| a.name.clear()), PolicyError::BadName { field: "name", value: String::new() }),
        (Box::new(|a| a.namespace = "a/b".into()), PolicyError::BadName { field: "namespace", value: "a/b".into() }),
        (
            Box::new(|a| first(a).source_ips[0].address = vec![10, 1, 0]),
            PolicyError::AddressLength { field: "source_ips", len: 3 },
        ),
        (
            Box::new(|a| first(a).not_source_ips[0].length = 33),
            PolicyError::PrefixLength { field: "not_source_ips", ip: "10.1.9.9".parse().expect("ip"), length: 33 },
        ),
        (
            Box::new(|a| first(a).destination_ips[0].length = 129),
            PolicyError::PrefixLength { field: "destination_ips", ip: "2001:db8::".parse().expect("ip"), length: 129 },
        ),
        // 288 would be 32 if truncated to a byte.
        (
            Box::new(|a| first(a).not_destination_ips[0].length = 288),
            PolicyError::PrefixLength { field: "not_destination_ips", ip: "::".parse().expect("ip"), length: 288 },
        ),
        // 73 616 would be 8 080 if truncated to 16 bits.
        (
            Box::new(|a| first(a).destination_ports[0] = 73_616),
            PolicyError::Port { field: "destination_ports", port: 73_616 },
        ),
        (Box::new(|a| first(a).principals[0].match_type = None), PolicyError::EmptyStringMatch { field: "principals" }),
    ];
    for (edit, want) in cases {
        let mut a = wire_policy(wire_match());
        edit(&mut a);
        assert_eq!(Policy::try_from(a).err(), Some(want.clone()), "{want}");
    }
    let mismatch = Policy::from_resource("shop/q", wire_policy(wire_match()));
    assert_eq!(mismatch.err(), Some(PolicyError::NameMismatch { resource: "shop/q".into(), key: "shop/p".into() }));
}

#[test]
fn deny_codes_are_stable() {
    assert_eq!(DenyCode::ExplicitlyDenied.as_str(), "explicitly_denied");
    assert_eq!(DenyCode::NotAllowed.as_str(), "not_allowed");
    assert_eq!(serde_json::to_string(&DenyCode::NotAllowed).expect("json"), "\"not_allowed\"");
}
