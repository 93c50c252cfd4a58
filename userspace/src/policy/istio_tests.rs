//! The translation of istio's AuthorizationPolicy and PeerAuthentication (`istio.rs`). Each
//! case of istiod's own tests (`pilot/pkg/serviceregistry/ambient/authorization_test.go`,
//! `ambientindex_test.go`, `testdata/*.yaml` through `TestRBACConvert`) is re-expressed here and
//! named in a comment; then what those leave implicit, the fail-closed handling, and the places
//! where meshpath departs from istiod.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use kube::api::DynamicObject;

use super::istio::*;
use super::tests::Conn;
use super::*;
use crate::identity::Identity;

const ROOT: &str = "istio-system";
const STATIC: &str = "istio-system/istio_converted_static_strict";

/// Strips the common indentation of a raw string, so specs can be written in place.
fn dedent(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let cut = lines.iter().map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    lines.iter().map(|l| format!("{}\n", &l[cut..])).collect()
}

fn object(kind: &str, namespace: &str, name: &str, meta: &str, spec: &str) -> DynamicObject {
    let spec: String = dedent(spec).lines().map(|l| format!("  {l}\n")).collect();
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{meta}spec:\n{spec}"
    );
    serde_yaml::from_str(&yaml).expect("a Kubernetes object")
}

fn ap(namespace: &str, name: &str, spec: &str) -> DynamicObject {
    object("AuthorizationPolicy", namespace, name, "", spec)
}

fn ap_dry_run(namespace: &str, name: &str, value: &str, spec: &str) -> DynamicObject {
    let meta = format!("  annotations:\n    istio.io/dry-run: \"{value}\"\n");
    object("AuthorizationPolicy", namespace, name, &meta, spec)
}

fn pa(namespace: &str, name: &str, spec: &str) -> DynamicObject {
    object("PeerAuthentication", namespace, name, "", spec)
}

fn pa_created(namespace: &str, name: &str, at: &str, spec: &str) -> DynamicObject {
    object("PeerAuthentication", namespace, name, &format!("  creationTimestamp: \"{at}\"\n"), spec)
}

fn translate(authz: &[DynamicObject], peer: &[DynamicObject]) -> Translation {
    Translation::new(ROOT, MtlsMode::Permissive, authz, peer)
}

fn get<'a>(t: &'a Translation, key: &str) -> &'a Policy {
    t.policies().get(key).unwrap_or_else(|| panic!("policy {key}"))
}

fn labels(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn app(value: &str) -> BTreeMap<String, String> {
    labels(&[("app", value)])
}

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|k| (*k).to_owned()).collect()
}

// ---- Expected shapes. ----

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn prefix(s: &str) -> StringMatch {
    StringMatch::Prefix(s.into())
}

fn suffix(s: &str) -> StringMatch {
    StringMatch::Suffix(s.into())
}

fn net(s: &str) -> IpNet {
    s.parse().expect("cidr")
}

fn account(ns: &str, sa: &str) -> ServiceAccountMatch {
    ServiceAccountMatch { namespace: ns.into(), service_account: sa.into() }
}

fn expected(key: &str, scope: Scope, action: Action, rules: Vec<Rule>) -> Policy {
    let (ns, name) = key.split_once('/').expect("ns/name");
    Policy::new(ns, name, scope, action, rules, false).expect("valid policy")
}

/// A rule of one clause of one Match.
fn one(m: Match) -> Rule {
    vec![vec![m]]
}

fn deny_plaintext() -> Match {
    Match { not_principals: vec![StringMatch::Presence], ..Match::default() }
}

fn plaintext_on(port: u16) -> Match {
    Match { destination_ports: vec![port], ..deny_plaintext() }
}

fn except_port(port: u16) -> Match {
    Match { not_destination_ports: vec![port], ..Match::default() }
}

// ---- Connections. ----

fn conn(identity: Option<(&str, &str)>, src: &str, dst: &str) -> Conn {
    Conn::new(identity.map(|(ns, sa)| Identity::new("cluster.local", ns, sa)), src, dst)
}

/// mTLS from `ns`/`sa` to port `port`.
fn from(ns: &str, sa: &str, port: u16) -> Conn {
    conn(Some((ns, sa)), "10.1.0.5:40000", &format!("10.2.0.7:{port}"))
}

fn plaintext(port: u16) -> Conn {
    conn(None, "10.1.0.5:40000", &format!("10.2.0.7:{port}"))
}

/// The decision for `c` at a workload of `ns` with `labels`, its policies chosen as istiod would.
fn decide_at(t: &Translation, ns: &str, labels: &BTreeMap<String, String>, c: &Conn) -> Decision {
    let named = t.workload_policies(ns, labels);
    t.policies().evaluate(&c.facts(), DestinationView { namespace: ns, policy_keys: &named }).decision
}

fn allowed(t: &Translation, ns: &str, labels: &BTreeMap<String, String>, c: &Conn) -> bool {
    decide_at(t, ns, labels, c) == Decision::Allow
}

fn denied_by(key: &str) -> Decision {
    Decision::Deny { code: DenyCode::ExplicitlyDenied, policy: Some(key.into()) }
}

fn not_allowed() -> Decision {
    Decision::Deny { code: DenyCode::NotAllowed, policy: None }
}

fn http_note(t: &Translation) -> Option<Vec<String>> {
    t.notes().iter().find_map(|n| match &n.note {
        NoteKind::HttpAttributes(list) => Some(list.clone()),
        _ => None,
    })
}

// ---- The resources. ----

#[test]
fn resources_are_security_istio_io_v1() {
    let ap = authorization_policy_resource();
    assert_eq!(
        (ap.group.as_str(), ap.version.as_str(), ap.api_version.as_str(), ap.kind.as_str(), ap.plural.as_str()),
        ("security.istio.io", "v1", "security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies")
    );
    let pa = peer_authentication_resource();
    assert_eq!((pa.kind.as_str(), pa.plural.as_str()), ("PeerAuthentication", "peerauthentications"));
}

// ---- authorization_test.go `TestConvertAuthorizationPolicyStatus`. ----

// "no status - targetRef is not for ztunnel", and ambientindex_test.go's gateway-targeted policy.
#[test]
fn a_policy_with_a_target_ref_is_a_waypoint_s_and_not_translated() {
    let t = translate(
        &[
            ap("shop", "one", "targetRef: {kind: Service, name: web}\nrules: []"),
            ap(
                "shop",
                "many",
                "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]\naction: DENY",
            ),
        ],
        &[],
    );
    assert!(t.policies().is_empty());
    assert!(t.refused().is_empty());
    let notes: Vec<_> = t.notes().iter().map(|n| (n.key.as_str(), &n.note)).collect();
    assert_eq!(notes, [("shop/one", &NoteKind::TargetRef), ("shop/many", &NoteKind::TargetRef)]);
}

// "no status - policy is fine": a named port. istiod drops it silently (its validation would
// have refused it); here it is refused and the ALLOW fails closed.
#[test]
fn a_named_port_is_refused_and_its_allow_allows_nothing() {
    let spec = r#"
        rules:
        - from: [{source: {principals: ["trust/ns/echo-1234/"]}}]
          to: [{operation: {ports: ["http"]}}]
    "#;
    let t = translate(&[ap("shop", "named-port", spec)], &[]);
    let r = &t.refused()[0];
    assert_eq!(r.error, TranslateError::Port { field: "ports".into(), value: "http".into() });
    assert_eq!(
        (r.key.as_str(), r.kind, r.outcome),
        ("shop/named-port", ObjectKind::AuthorizationPolicy, FailClosed::AllowNothing)
    );
    assert_eq!(*get(&t, "shop/named-port"), expected("shop/named-port", Scope::Namespace, Action::Allow, vec![]));
}

// "unsupported AUDIT action", "unsupported CUSTOM action".
#[test]
fn audit_and_custom_are_not_translated() {
    let rule = "rules: [{from: [{source: {principals: [a]}}], to: [{operation: {ports: [\"80\"]}}]}]";
    let t = translate(
        &[
            ap("shop", "audit", &format!("action: AUDIT\n{rule}")),
            ap("shop", "custom", &format!("action: CUSTOM\n{rule}")),
        ],
        &[],
    );
    assert!(t.policies().is_empty() && t.refused().is_empty());
    let notes: Vec<_> = t.notes().iter().map(|n| n.note.clone()).collect();
    assert_eq!(
        notes,
        [
            NoteKind::UnsupportedAction(AuthorizationAction::Audit),
            NoteKind::UnsupportedAction(AuthorizationAction::Custom)
        ]
    );
}

// "unsupported HTTP methods": an ALLOW rule with HTTP attributes is dropped; they are reported.
#[test]
fn http_attributes_drop_an_allow_rule() {
    let spec = r#"
        rules:
        - from: [{source: {requestPrincipals: ["example.com/sub-1"]}}]
          to: [{operation: {methods: ["GET"]}}]
          when: [{key: request.auth.presenter, values: ["presenter.example.com"]}]
    "#;
    let t = translate(&[ap("shop", "http", spec)], &[]);
    assert_eq!(get(&t, "shop/http").rules(), &[] as &[Rule]);
    assert_eq!(http_note(&t), Some(keys(&["methods", "request.auth.presenter", "requestPrincipals"])));
    // Nothing matches the ALLOW, so it denies its namespace.
    assert_eq!(decide_at(&t, "shop", &app("web"), &from("shop", "web", 80)), not_allowed());
}

// The DENY cases of `TestConvertAuthorizationPolicyStatus`: whether foo/bar is denied (the
// cases with `expectEffectiveRules`), and whether any HTTP attribute is reported.
#[test]
fn http_attributes_are_trimmed_from_a_deny() {
    let bar = r#"{source: {principals: ["cluster.local/ns/foo/sa/bar"]}}"#;
    let l7 = r#"{source: {notRequestPrincipals: ["example.com/sub-1"]}}"#;
    let mixed =
        r#"{source: {principals: ["cluster.local/ns/foo/sa/bar"], notRequestPrincipals: ["example.com/sub-1"]}}"#;
    let cases: Vec<(&str, String, bool, bool, bool)> = vec![
        // (istiod's case, rules, bar denied, anyone else denied, HTTP reported)
        ("DENY policy with only L4 attributes", format!("- from: [{bar}]"), true, false, false),
        ("DENY policy with only L7 attributes", format!("- from: [{l7}]"), false, false, true),
        ("DENY policy with mixed L4 and L7 attributes", format!("- from: [{mixed}]"), true, false, true),
        (
            "DENY policy with L7-only and separate L4 rule",
            format!("- from: [{l7}]\n- from: [{bar}]"),
            true,
            false,
            true,
        ),
        ("DENY policy with empty catch-all rule and L7-only rule", format!("- {{}}\n- from: [{l7}]"), true, true, true),
        (
            "DENY policy with L4 From and L7 When",
            format!("- from: [{bar}]\n  when: [{{key: \"request.headers[x-token]\", values: [secret]}}]"),
            false,
            false,
            true,
        ),
        (
            "DENY policy with L4 From and L7-only To methods",
            format!("- from: [{bar}]\n  to: [{{operation: {{methods: [GET]}}}}]"),
            false,
            false,
            true,
        ),
    ];
    for (case, rules, bar_denied, other_denied, reported) in cases {
        let t = translate(&[ap("shop", "deny", &format!("action: DENY\nrules:\n{rules}"))], &[]);
        assert!(t.refused().is_empty(), "{case}: {:?}", t.refused());
        let denied = |c: &Conn| decide_at(&t, "shop", &app("web"), c) == denied_by("shop/deny");
        assert_eq!(denied(&from("foo", "bar", 80)), bar_denied, "{case}");
        assert_eq!(denied(&from("foo", "baz", 80)), other_denied, "{case}");
        assert_eq!(http_note(&t).is_some(), reported, "{case}");
    }
}

// ---- testdata via `TestRBACConvert`. ----

// allow-full-in.yaml → allow-full.yaml: every attribute once; HTTP ones drop their rule.
#[test]
fn allow_full_converts_each_kind_and_drops_each_http_rule() {
    let spec = r#"
        action: ALLOW
        rules:
        - from: [{source: {principals: [principal, principal-prefix-*, "*-suffix-principal", "*"], notPrincipals: [not-principal, not-principal-prefix-*, "*-suffix-not-principal", "*"]}}]
        - from: [{source: {serviceAccounts: [ns/sa, sa-only], notServiceAccounts: [ns/sa-not, sa-not-only]}}]
        - from: [{source: {requestPrincipals: [rp, "*"], notRequestPrincipals: [nrp]}}]
        - from: [{source: {namespaces: [ns, ns-prefix-*, "*-ns-suffix", "*"], notNamespaces: [not-ns, not-ns-prefix-*, "*-not-ns-suffix", "*"]}}]
        - from: [{source: {ipBlocks: [1.2.3.4, 5.6.0.0/16], notIpBlocks: [2.2.3.4, 6.6.0.0/16]}}]
        - from: [{source: {remoteIpBlocks: [1.2.3.4], notRemoteIpBlocks: [2.2.3.4]}}]
        - to: [{operation: {methods: [method, "*"], notMethods: [not-method]}}]
        - to: [{operation: {hosts: [exact.com, "*.suffix.com"], notHosts: [not-exact.com]}}]
        - to: [{operation: {ports: ["80", "90"], notPorts: ["800", "900"]}}]
        - to: [{operation: {paths: [/exact, /prefix/*], notPaths: [/not-exact]}}]
        - when: [{key: "request.headers[X-header]", values: [header], notValues: [not-header]}]
        - when: [{key: source.ip, values: [10.10.10.10, 192.168.10.0/24], notValues: [90.10.10.10, 90.168.10.0/24]}]
        - when: [{key: remote.ip, values: [10.10.10.10], notValues: [90.10.10.10]}]
        - when: [{key: source.namespace, values: [ns, ns-prefix-*, "*-ns-suffix", "*"], notValues: [not-ns, not-ns-prefix-*, "*-not-ns-suffix", "*"]}]
        - when: [{key: source.principal, values: [principal, principal-prefix-*, "*-suffix-principal", "*"], notValues: [not-principal, not-principal-prefix-*, "*-not-suffix-principal", "*"]}]
        - when: [{key: request.auth.principal, values: [rp]}]
        - when: [{key: request.auth.audiences, values: [aud]}]
        - when: [{key: request.auth.presenter, values: [pres]}]
        - when: [{key: "request.auth.claims[iss]", values: [iss]}]
        - when: [{key: "request.auth.claims[nested1][nested2]", values: [nested]}]
        - when: [{key: destination.ip, values: [10.10.10.10, 192.168.10.0/24], notValues: [90.10.10.10, 90.168.10.0/24]}]
        - when: [{key: destination.port, values: ["91", "92"], notValues: ["9001", "9002"]}]
        - when: [{key: connection.sni, values: [exact.com]}]
        - when: [{key: "experimental.envoy.filters.a.b[c]", values: [exact]}]
    "#;
    let t = translate(&[ap("cfg", "allow", spec)], &[]);
    assert!(t.refused().is_empty(), "{:?}", t.refused());
    let kinds = |e: &str, p: &str, s: &str| vec![exact(e), prefix(p), suffix(s), StringMatch::Presence];
    let m = Match::default;
    let want = vec![
        one(Match {
            principals: kinds("principal", "principal-prefix-", "-suffix-principal"),
            not_principals: kinds("not-principal", "not-principal-prefix-", "-suffix-not-principal"),
            ..m()
        }),
        one(Match {
            service_accounts: vec![account("ns", "sa"), account("cfg", "sa-only")],
            not_service_accounts: vec![account("ns", "sa-not"), account("cfg", "sa-not-only")],
            ..m()
        }),
        one(Match {
            namespaces: kinds("ns", "ns-prefix-", "-ns-suffix"),
            not_namespaces: kinds("not-ns", "not-ns-prefix-", "-not-ns-suffix"),
            ..m()
        }),
        one(Match {
            source_ips: vec![net("1.2.3.4/32"), net("5.6.0.0/16")],
            not_source_ips: vec![net("2.2.3.4/32"), net("6.6.0.0/16")],
            ..m()
        }),
        one(Match { destination_ports: vec![80, 90], not_destination_ports: vec![800, 900], ..m() }),
        one(Match {
            source_ips: vec![net("10.10.10.10/32"), net("192.168.10.0/24")],
            not_source_ips: vec![net("90.10.10.10/32"), net("90.168.10.0/24")],
            ..m()
        }),
        one(Match {
            namespaces: kinds("ns", "ns-prefix-", "-ns-suffix"),
            not_namespaces: kinds("not-ns", "not-ns-prefix-", "-not-ns-suffix"),
            ..m()
        }),
        one(Match {
            principals: kinds("principal", "principal-prefix-", "-suffix-principal"),
            not_principals: kinds("not-principal", "not-principal-prefix-", "-not-suffix-principal"),
            ..m()
        }),
        one(Match {
            destination_ips: vec![net("10.10.10.10/32"), net("192.168.10.0/24")],
            not_destination_ips: vec![net("90.10.10.10/32"), net("90.168.10.0/24")],
            ..m()
        }),
        one(Match { destination_ports: vec![91, 92], not_destination_ports: vec![9001, 9002], ..m() }),
    ];
    assert_eq!(*get(&t, "cfg/allow"), expected("cfg/allow", Scope::Namespace, Action::Allow, want));
    let mut http = keys(&[
        "requestPrincipals",
        "notRequestPrincipals",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "methods",
        "notMethods",
        "hosts",
        "notHosts",
        "paths",
        "notPaths",
        "request.headers[X-header]",
        "remote.ip",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims[iss]",
        "request.auth.claims[nested1][nested2]",
        "connection.sni",
        "experimental.envoy.filters.a.b[c]",
    ]);
    http.sort();
    assert_eq!(http_note(&t), Some(http));
}

const GROUPS: &str = r#"
    rules:
    - from: [{source: {principals: [from-mix-principal], requestPrincipals: [from-mix-rp], namespaces: [from-mix-ns]}}]
      to: [{operation: {ports: ["80"]}}]
    - from: [{source: {principals: [to-mix-principal], namespaces: [to-mix-ns]}}]
      to: [{operation: {ports: ["80"], methods: [to-mix-method]}}]
    - from: [{source: {principals: [only-l4-principals], namespaces: [only-l4-ns]}}]
      to: [{operation: {ports: ["80"]}}]
    - from: [{source: {requestPrincipals: [l7-principal]}}]
      to: [{operation: {paths: [/l7-foo], methods: [l7-method]}}]
    - when: [{key: source.namespace, values: [when-l4-l7-ns]}, {key: connection.sni, values: [when-l4-l7-sni]}]
    - when: [{key: source.namespace, values: [when-l4-ns]}, {key: source.ip, values: [10.10.10.10], notValues: [20.20.20.20]}]
    - when: [{key: connection.sni, values: [when-l7-sni]}, {key: "request.headers[X-header]", values: [when-l7-header]}]
"#;

fn ports80() -> Vec<Match> {
    vec![Match { destination_ports: vec![80], ..Match::default() }]
}

fn ns_and_principal(ns: &str, principal: &str) -> Vec<Match> {
    vec![Match { namespaces: vec![exact(ns)], principals: vec![exact(principal)], ..Match::default() }]
}

fn ns_only(ns: &str) -> Vec<Match> {
    vec![Match { namespaces: vec![exact(ns)], ..Match::default() }]
}

fn when_ip() -> Vec<Match> {
    vec![Match {
        source_ips: vec![net("10.10.10.10/32")],
        not_source_ips: vec![net("20.20.20.20/32")],
        ..Match::default()
    }]
}

// allow-groups-in.yaml → allow-groups.yaml: only the rules without HTTP attributes remain,
// each `to`, `from` and `when` its own clause, in that order.
#[test]
fn allow_groups_keep_only_the_l4_rules() {
    let t = translate(&[ap("cfg", "groups", GROUPS)], &[]);
    let want = vec![
        vec![ports80(), ns_and_principal("only-l4-ns", "only-l4-principals")],
        vec![ns_only("when-l4-ns"), when_ip()],
    ];
    assert_eq!(*get(&t, "cfg/groups"), expected("cfg/groups", Scope::Namespace, Action::Allow, want));
}

// deny-groups-in.yaml → deny-groups.yaml: every rule kept, HTTP parts as empty Matches.
#[test]
fn deny_groups_keep_every_rule_without_its_http_parts() {
    let t = translate(&[ap("cfg", "groups-deny", &format!("action: DENY\n{}", dedent(GROUPS)))], &[]);
    let empty = || vec![Match::default()];
    let want = vec![
        vec![ports80(), ns_and_principal("from-mix-ns", "from-mix-principal")],
        vec![ports80(), ns_and_principal("to-mix-ns", "to-mix-principal")],
        vec![ports80(), ns_and_principal("only-l4-ns", "only-l4-principals")],
        vec![empty(), empty()],
        vec![ns_only("when-l4-l7-ns"), empty()],
        vec![ns_only("when-l4-ns"), when_ip()],
        vec![empty(), empty()],
    ];
    assert_eq!(*get(&t, "cfg/groups-deny"), expected("cfg/groups-deny", Scope::Namespace, Action::Deny, want));
    // The trimmed rules still deny what their L4 part names ...
    let c = conn(Some(("when-l4-ns", "x")), "10.10.10.10:1", "10.2.0.7:80");
    assert_eq!(decide_at(&t, "cfg", &app("a"), &c), denied_by("cfg/groups-deny"));
    // ... and the rules left with an empty Match deny nothing.
    assert!(allowed(&t, "cfg", &app("a"), &from("when-l4-l7-ns", "x", 80)));
}

/// The converted policies of PeerAuthentications in `foo` (root `istio-system`).
fn converted(peer: &[DynamicObject]) -> Vec<Policy> {
    let t = translate(&[], peer);
    assert!(t.refused().is_empty(), "{:?}", t.refused());
    let mut keys: Vec<String> = peer
        .iter()
        .map(|o| format!("foo/converted_peer_authentication_{}", o.metadata.name.clone().unwrap_or_default()))
        .collect();
    keys.sort();
    keys.dedup();
    keys.iter().filter_map(|k| t.policies().get(k).map(|p| (**p).clone())).collect()
}

// The PeerAuthentication cases of testdata/peer-authn-*-in.yaml → peer-authn-*.yaml. Single
// objects have no namespace or mesh policy (the default is PERMISSIVE).
#[test]
fn peer_authentications_convert_as_istiod_s_testdata() {
    let workload = |mode: &str, ports: &str| {
        let mtls = if mode.is_empty() { String::new() } else { format!("mtls: {{mode: {mode}}}\n") };
        pa("foo", "w", &format!("selector: {{matchLabels: {{app: a}}}}\n{mtls}portLevelMtls: {ports}"))
    };
    let mesh = |mode: &str| pa(ROOT, "default-mesh", &format!("mtls: {{mode: {mode}}}"));
    let namespace = |mode: &str| pa("foo", "default-foo", &format!("mtls: {{mode: {mode}}}"));
    let deny = |rules: Vec<Rule>| {
        vec![expected("foo/converted_peer_authentication_w", Scope::WorkloadSelector, Action::Deny, rules)]
    };
    let none = Vec::new;
    let cases: Vec<(&str, Vec<DynamicObject>, Vec<Policy>)> = vec![
        ("peer-authn-disable", vec![pa("foo", "w", "mtls: {mode: DISABLE}")], none()),
        ("peer-authn-permissive", vec![pa("foo", "w", "mtls: {mode: PERMISSIVE}")], none()),
        ("peer-authn-strict", vec![pa("foo", "w", "mtls: {mode: STRICT}")], none()),
        (
            "peer-authn-strict-workload",
            vec![pa("foo", "w", "selector: {matchLabels: {app: a}}\nmtls: {mode: STRICT}")],
            none(),
        ),
        (
            "peer-authn-disable-port-mtls-strict",
            vec![workload("DISABLE", "{\"9090\": {mode: STRICT}}")],
            deny(vec![one(plaintext_on(9090))]),
        ),
        (
            "peer-authn-permissive-port-mtls-strict",
            vec![workload("PERMISSIVE", "{\"9090\": {mode: STRICT}}")],
            deny(vec![one(plaintext_on(9090))]),
        ),
        (
            "peer-authn-permissive-port-mtls-strict-and-permissive",
            vec![workload("PERMISSIVE", "{\"9090\": {mode: STRICT}, \"8080\": {mode: PERMISSIVE}}")],
            deny(vec![one(plaintext_on(9090))]),
        ),
        (
            "peer-authn-strict-and-disable-port-mtls",
            vec![workload("STRICT", "{\"9090\": {mode: DISABLE}}")],
            deny(vec![vec![vec![deny_plaintext()], vec![except_port(9090)]]]),
        ),
        (
            "peer-authn-strict-and-permissive-port-mtls",
            vec![workload("STRICT", "{\"9090\": {mode: PERMISSIVE}}")],
            deny(vec![vec![vec![deny_plaintext()], vec![except_port(9090)]]]),
        ),
        ("peer-authn-strict-and-strict-port-mtls", vec![workload("STRICT", "{\"8080\": {mode: STRICT}}")], none()),
        (
            "peer-authn-strict-port-mtls-strict-and-permissive",
            vec![workload("STRICT", "{\"9090\": {mode: STRICT}, \"8080\": {mode: PERMISSIVE}}")],
            deny(vec![vec![vec![deny_plaintext()], vec![except_port(8080)]]]),
        ),
        (
            "peer-authn-unset-port-mtls-strict",
            vec![workload("UNSET", "{\"8080\": {mode: STRICT}}")],
            deny(vec![one(plaintext_on(8080))]),
        ),
        (
            "peer-authn-permissive-root-permissive-namespace-strict-workload-ports",
            vec![
                mesh("PERMISSIVE"),
                namespace("PERMISSIVE"),
                workload("", "{\"9090\": {mode: STRICT}, \"8080\": {mode: STRICT}}"),
            ],
            deny(vec![one(plaintext_on(8080)), one(plaintext_on(9090))]),
        ),
        (
            "peer-authn-permissive-root-permissive-workload",
            vec![mesh("PERMISSIVE"), workload("", "{\"9090\": {mode: PERMISSIVE}}")],
            none(),
        ),
        (
            "peer-authn-permissive-root-strict-namespace-permissive-workload",
            vec![mesh("PERMISSIVE"), namespace("STRICT"), workload("", "{\"9090\": {mode: PERMISSIVE}}")],
            deny(vec![vec![vec![except_port(9090)], vec![deny_plaintext()]]]),
        ),
        (
            "peer-authn-permissive-root-unset-namespace-mixed-workload-ports",
            vec![
                mesh("PERMISSIVE"),
                namespace("UNSET"),
                workload("", "{\"9090\": {mode: STRICT}, \"8080\": {mode: PERMISSIVE}}"),
            ],
            deny(vec![one(plaintext_on(9090))]),
        ),
        (
            "peer-authn-strict-root-permissive-namespace-strict-workload",
            vec![mesh("STRICT"), namespace("PERMISSIVE"), workload("", "{\"9090\": {mode: STRICT}}")],
            deny(vec![one(plaintext_on(9090))]),
        ),
        (
            "peer-authn-strict-root-permissive-workload",
            vec![mesh("STRICT"), workload("", "{\"9090\": {mode: PERMISSIVE}}")],
            deny(vec![vec![vec![except_port(9090)], vec![deny_plaintext()]]]),
        ),
        (
            "peer-authn-strict-root-unset-workload-port-mtls-strict-and-permissive",
            vec![mesh("STRICT"), workload("", "{\"9090\": {mode: PERMISSIVE}, \"8080\": {mode: STRICT}}")],
            deny(vec![vec![vec![except_port(9090)], vec![deny_plaintext()]]]),
        ),
    ];
    for (case, peer, want) in cases {
        assert_eq!(converted(&peer), want, "{case}");
    }
}

// ---- ambientindex_test.go. ----

/// The objects of one moment, replaced and deleted by name as a test goes.
#[derive(Default)]
struct Cluster {
    authz: BTreeMap<(String, String), DynamicObject>,
    peer: BTreeMap<(String, String), DynamicObject>,
}

impl Cluster {
    fn ap(&mut self, ns: &str, name: &str, spec: &str) {
        self.authz.insert((ns.into(), name.into()), ap(ns, name, spec));
    }

    fn pa(&mut self, ns: &str, name: &str, spec: &str) {
        self.peer.insert((ns.into(), name.into()), pa(ns, name, spec));
    }

    fn delete_ap(&mut self, ns: &str, name: &str) {
        self.authz.remove(&(ns.into(), name.into()));
    }

    fn delete_pa(&mut self, ns: &str, name: &str) {
        self.peer.remove(&(ns.into(), name.into()));
    }

    fn translate(&self) -> Translation {
        Translation::new(ROOT, MtlsMode::Permissive, self.authz.values(), self.peer.values())
    }

    fn keys(&self, ns: &str, app_label: &str) -> Vec<String> {
        self.translate().workload_policies(ns, &app(app_label))
    }
}

// `TestAmbientIndex_Policy`, step by step: pod1 and pod2 are `app: a` in ns1 (pod2 starts as
// `app: not-a`), the waypoint pods are neither.
#[test]
fn workloads_name_the_policies_istiod_would_give_them() {
    let converted = "ns1/converted_peer_authentication_selector";
    let selector = "selector: {matchLabels: {app: a}}\n";
    let mut c = Cluster::default();

    c.pa(ROOT, "global", "mtls: {mode: PERMISSIVE}");
    assert!(c.translate().policies().get(STATIC).is_some(), "sent once a PeerAuthentication exists");
    assert_eq!(c.keys("ns1", "a"), keys(&[]));

    c.pa("ns1", "namespace", "mtls: {mode: STRICT}");
    assert_eq!(c.keys("ns1", "a"), keys(&[STATIC]));
    assert_eq!(c.keys("ns1", "waypoint"), keys(&[STATIC]));

    c.pa("ns1", "selector", &format!("{selector}mtls: {{mode: STRICT}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&[STATIC]));

    c.pa("ns1", "selector", &format!("{selector}mtls: {{mode: PERMISSIVE}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&[]));

    c.pa(
        "ns1",
        "selector",
        &format!("{selector}mtls: {{mode: PERMISSIVE}}\nportLevelMtls: {{\"9090\": {{mode: STRICT}}}}"),
    );
    assert_eq!(c.keys("ns1", "a"), keys(&[converted]));
    assert_eq!(c.keys("ns1", "not-a"), keys(&[STATIC]), "pod2 outside the selector: the namespace's");

    // A selector in the root namespace: PeerAuthentication has no mesh-wide selectors.
    c.pa(ROOT, "global-selector", &format!("{selector}mtls: {{mode: STRICT}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&[converted]));
    c.delete_pa(ROOT, "global-selector");

    c.pa(
        "ns1",
        "selector",
        &format!("{selector}mtls: {{mode: PERMISSIVE}}\nportLevelMtls: {{\"9090\": {{mode: PERMISSIVE}}}}"),
    );
    assert_eq!(c.keys("ns1", "a"), keys(&[]));

    c.pa("ns1", "namespace", "mtls: {mode: PERMISSIVE}");
    assert_eq!(c.keys("ns1", "a"), keys(&[]));
    assert_eq!(c.keys("ns1", "waypoint"), keys(&[]));

    c.pa("ns1", "selector", &format!("{selector}mtls: {{mode: STRICT}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&[STATIC]));

    c.pa(
        "ns1",
        "selector",
        &format!("{selector}mtls: {{mode: STRICT}}\nportLevelMtls: {{\"9090\": {{mode: PERMISSIVE}}}}"),
    );
    assert_eq!(c.keys("ns1", "a"), keys(&[converted]));

    c.pa("ns1", "selector", &format!("{selector}portLevelMtls: {{\"9090\": {{mode: STRICT}}}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&[converted]), "UNSET under a PERMISSIVE namespace, one STRICT port");

    c.pa("ns1", "namespace", "mtls: {mode: STRICT}");
    assert_eq!(c.keys("ns1", "a"), keys(&[STATIC]));
    assert_eq!(c.keys("ns1", "waypoint"), keys(&[STATIC]));

    c.pa("ns1", "selector", &format!("{selector}portLevelMtls: {{\"9090\": {{mode: PERMISSIVE}}}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&[converted]), "the strict part is in the converted policy");
    let want = vec![vec![vec![except_port(9090)], vec![deny_plaintext()]]];
    assert_eq!(*get(&c.translate(), converted), expected(converted, Scope::WorkloadSelector, Action::Deny, want));

    c.delete_pa("ns1", "selector");
    assert_eq!(c.keys("ns1", "a"), keys(&[STATIC]));

    c.delete_pa("ns1", "namespace");
    c.delete_pa(ROOT, "global");
    assert!(c.translate().policies().is_empty());
    assert_eq!(c.keys("ns1", "a"), keys(&[]));

    // AuthorizationPolicies: GLOBAL and NAMESPACE ones are not named by workloads.
    c.ap(ROOT, "global", "{}");
    c.ap("ns1", "namespace", "{}");
    let t = c.translate();
    assert_eq!(get(&t, "istio-system/global").scope(), Scope::Global);
    assert_eq!(get(&t, "ns1/namespace").scope(), Scope::Namespace);
    assert_eq!(c.keys("ns1", "a"), keys(&[]));

    c.ap("ns1", "selector", selector);
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector"]));
    assert_eq!(c.keys("ns1", "not-a"), keys(&[]));

    c.ap(ROOT, "global-selector", selector);
    assert_eq!(c.keys("ns1", "a"), keys(&["istio-system/global-selector", "ns1/selector"]));

    c.ap(ROOT, "global-selector", "selector: {matchLabels: {app: not-a}}");
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector"]));

    c.pa(ROOT, "strict", "mtls: {mode: STRICT}");
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector", STATIC]));
    assert_eq!(c.keys("ns1", "waypoint"), keys(&[STATIC]));

    c.pa("ns1", "selector-strict", &format!("{selector}mtls: {{mode: STRICT}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector", STATIC]));

    c.pa("ns1", "selector-strict", &format!("{selector}mtls: {{mode: PERMISSIVE}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector"]));

    c.pa("ns1", "selector-strict", &format!("{selector}mtls: {{mode: DISABLE}}"));
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector"]));

    let selector_strict = "ns1/converted_peer_authentication_selector-strict";
    c.pa(
        "ns1",
        "selector-strict",
        &format!("{selector}mtls: {{mode: STRICT}}\nportLevelMtls: {{\"9090\": {{mode: PERMISSIVE}}}}"),
    );
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector", selector_strict]));

    c.ap(
        "ns1",
        "selector",
        &format!("{selector}rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns1/sa/sa1]}}}}]}}]"),
    );
    assert_eq!(c.keys("ns1", "a"), keys(&["ns1/selector", selector_strict]));

    c.delete_ap("ns1", "selector");
    assert_eq!(c.keys("ns1", "a"), keys(&[selector_strict]));

    c.delete_pa("ns1", "selector-strict");
    assert_eq!(c.keys("ns1", "a"), keys(&[STATIC]));

    c.delete_pa(ROOT, "strict");
    assert_eq!(c.keys("ns1", "a"), keys(&[]));

    c.ap(
        "ns1",
        "gateway-targeted",
        "targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: dummy-waypoint}",
    );
    assert!(c.translate().policies().get("ns1/gateway-targeted").is_none());
}

// `TestAmbientIndex_PeerAuthenticationNamespacePolicyChange`: the name a workload lists and the
// converted policy come and go together.
#[test]
fn a_converted_policy_follows_its_namespace_s_mode() {
    let converted = "ns1/converted_peer_authentication_selector";
    let mut c = Cluster::default();
    c.pa("ns1", "namespace", "mtls: {mode: STRICT}");
    c.pa("ns1", "selector", "selector: {matchLabels: {app: a}}\nportLevelMtls: {\"9090\": {mode: PERMISSIVE}}");
    assert_eq!(c.keys("ns1", "a"), keys(&[converted]));
    assert!(c.translate().policies().get(converted).is_some());
    c.pa("ns1", "namespace", "mtls: {mode: PERMISSIVE}");
    assert_eq!(c.keys("ns1", "a"), keys(&[]));
    assert!(c.translate().policies().get(converted).is_none());
}

// ---- Scopes and selection. ----

#[test]
fn scope_follows_selector_and_namespace() {
    let t = translate(
        &[
            ap(ROOT, "mesh", "{}"),
            ap(ROOT, "mesh-selected", "selector: {matchLabels: {app: db}}"),
            ap("shop", "all", "{}"),
            ap("shop", "db", "selector: {matchLabels: {app: db, tier: data}}"),
            ap("bank", "db", "selector: {matchLabels: {app: db}}"),
            // No labels is no selector, as the API documents (istiod would attach it to nothing).
            ap("shop", "empty-selector", "selector: {}"),
            ap("shop", "empty-labels", "selector: {matchLabels: {}}"),
        ],
        &[],
    );
    let scope = |k| get(&t, k).scope();
    assert_eq!(scope("istio-system/mesh"), Scope::Global);
    assert_eq!(scope("istio-system/mesh-selected"), Scope::WorkloadSelector);
    assert_eq!(scope("shop/all"), Scope::Namespace);
    assert_eq!(scope("shop/db"), Scope::WorkloadSelector);
    assert_eq!(scope("shop/empty-selector"), Scope::Namespace);
    assert_eq!(scope("shop/empty-labels"), Scope::Namespace);
    let db = labels(&[("app", "db"), ("tier", "data"), ("version", "v2")]);
    assert_eq!(t.workload_policies("shop", &db), keys(&["istio-system/mesh-selected", "shop/db"]));
    // Every selector label must be there.
    assert_eq!(t.workload_policies("shop", &app("db")), keys(&["istio-system/mesh-selected"]));
    // A namespace's selector policy is for its own workloads only; the root's for all.
    assert_eq!(t.workload_policies("bank", &db), keys(&["bank/db", "istio-system/mesh-selected"]));
    assert_eq!(t.workload_policies("other", &db), keys(&["istio-system/mesh-selected"]));
    assert_eq!(t.workload_policies("shop", &BTreeMap::new()), keys(&[]));
}

// ---- Rules as evaluated. ----

/// Whether an ALLOW of one rule (`rule`, YAML) in `shop` lets each connection reach `shop`.
fn allow_rule(rule: &str, conns: &[&Conn]) -> Vec<bool> {
    let t = translate(&[ap("shop", "p", &format!("rules:\n- {rule}"))], &[]);
    assert!(t.refused().is_empty(), "{rule}: {:?}", t.refused());
    conns.iter().map(|c| allowed(&t, "shop", &app("web"), c)).collect()
}

#[test]
fn each_match_kind_with_and_without_not() {
    let web = conn(Some(("shop", "web")), "10.1.0.5:40000", "10.2.0.7:8080");
    let teller = conn(Some(("bank", "teller")), "10.9.0.3:40000", "10.2.0.8:9090");
    let plain = conn(None, "10.1.0.5:40000", "10.2.0.7:8080");
    let conns = [&web, &teller, &plain];
    let cases = [
        ("from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]", [true, false, false]),
        ("from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/web]}}]", [false, true, true]),
        ("from: [{source: {namespaces: [shop]}}]", [true, false, false]),
        ("from: [{source: {notNamespaces: [shop]}}]", [false, true, true]),
        ("from: [{source: {serviceAccounts: [web]}}]", [true, false, false]),
        ("from: [{source: {notServiceAccounts: [shop/web]}}]", [false, true, true]),
        ("from: [{source: {serviceAccounts: [bank/teller]}}]", [false, true, false]),
        ("from: [{source: {ipBlocks: [10.1.0.0/16]}}]", [true, false, true]),
        ("from: [{source: {notIpBlocks: [10.1.0.0/16]}}]", [false, true, false]),
        ("to: [{operation: {ports: [\"8080\"]}}]", [true, false, true]),
        ("to: [{operation: {notPorts: [\"8080\"]}}]", [false, true, false]),
        ("when: [{key: source.ip, values: [10.9.0.3]}]", [false, true, false]),
        ("when: [{key: source.ip, notValues: [10.9.0.3]}]", [true, false, true]),
        ("when: [{key: source.namespace, values: [bank]}]", [false, true, false]),
        ("when: [{key: source.namespace, notValues: [bank]}]", [true, false, true]),
        ("when: [{key: source.principal, values: [\"*/sa/web\"]}]", [true, false, false]),
        ("when: [{key: source.principal, notValues: [\"*/sa/web\"]}]", [false, true, true]),
        ("when: [{key: destination.ip, values: [10.2.0.8]}]", [false, true, false]),
        ("when: [{key: destination.ip, notValues: [10.2.0.0/29]}]", [false, true, false]),
        ("when: [{key: destination.port, values: [\"9090\"]}]", [false, true, false]),
        ("when: [{key: destination.port, notValues: [\"9090\"]}]", [true, false, true]),
        // Values of a kind are OR-ed, kinds AND-ed, each `when` its own (AND-ed) clause.
        ("from: [{source: {namespaces: [shop, bank]}}]", [true, true, false]),
        ("from: [{source: {namespaces: [shop], ipBlocks: [10.9.0.0/16]}}]", [false, false, false]),
        ("from: [{source: {namespaces: [shop]}}, {source: {ipBlocks: [10.9.0.0/16]}}]", [true, true, false]),
        (
            "when: [{key: source.namespace, values: [bank]}, {key: destination.port, values: [\"8080\"]}]",
            [false, false, false],
        ),
    ];
    for (rule, want) in cases {
        assert_eq!(allow_rule(rule, &conns), want, "{rule}");
    }
}

#[test]
fn principal_wildcards_are_presence_prefix_and_suffix() {
    let b = from("a", "b", 80);
    let evil = from("a", "b-evil", 80);
    let plain = plaintext(80);
    let conns = [&b, &evil, &plain];
    let principal = |p: &str| format!("from: [{{source: {{principals: [\"{p}\"]}}}}]");
    // A suffix anchored at `/sa/`: b-evil is not b.
    assert_eq!(allow_rule(&principal("*/ns/a/sa/b"), &conns), [true, false, false]);
    assert_eq!(allow_rule(&principal("cluster.local/ns/a/sa/b"), &conns), [true, false, false]);
    // A prefix is a prefix: `b*` admits b-evil.
    assert_eq!(allow_rule(&principal("cluster.local/ns/a/sa/b*"), &conns), [true, true, false]);
    // `*` is any identity, never plaintext.
    assert_eq!(allow_rule(&principal("*"), &conns), [true, true, false]);
    // Principals are matched without the scheme; istiod passes one with it through unchanged.
    assert_eq!(allow_rule(&principal("spiffe://cluster.local/ns/a/sa/b"), &conns), [false, false, false]);
}

// An ALLOW without rules allows nothing; `rules: [{}]` allows everything (istio's documented
// allow-nothing and allow-all). A DENY with `rules: [{}]` denies everything, without rules nothing.
#[test]
fn empty_rules_versus_an_empty_rule() {
    let cases = [
        ("{}", Some(not_allowed())),
        ("rules: []", Some(not_allowed())),
        ("rules: null", Some(not_allowed())),
        ("rules: [{}]", None),
        ("action: DENY\nrules: [{}]", Some(denied_by("shop/p"))),
        ("action: DENY", None),
    ];
    for (spec, want) in cases {
        let t = translate(&[ap("shop", "p", spec)], &[]);
        let got = decide_at(&t, "shop", &app("web"), &from("bank", "teller", 80));
        assert_eq!(got, want.unwrap_or(Decision::Allow), "{spec}");
    }
}

#[test]
fn an_allow_whose_every_rule_is_dropped_allows_nothing() {
    let spec = r#"
        rules:
        - to: [{operation: {methods: [GET], ports: ["80"]}}]
        - from: [{source: {requestPrincipals: ["*"]}}]
        - when: [{key: connection.sni, values: [web.shop]}]
    "#;
    let t = translate(&[ap("shop", "http-only", spec), ap("bank", "other", "rules: [{}]")], &[]);
    assert!(get(&t, "shop/http-only").rules().is_empty());
    assert_eq!(decide_at(&t, "shop", &app("web"), &from("shop", "web", 80)), not_allowed());
    assert!(allowed(&t, "bank", &app("web"), &from("shop", "web", 80)), "other namespaces untouched");
}

// Trust domains have no place in ztunnel's Match; istiod drops them, which widens an ALLOW. Here
// they count as HTTP attributes.
#[test]
fn trust_domains_drop_an_allow_rule_and_are_trimmed_from_a_deny() {
    let rule = "rules: [{from: [{source: {namespaces: [bank], trustDomains: [bank.example]}}]}]";
    let t = translate(&[ap("shop", "allow", rule), ap("pay", "deny", &format!("action: DENY\n{rule}"))], &[]);
    assert!(get(&t, "shop/allow").rules().is_empty());
    assert_eq!(http_note(&t), Some(keys(&["trustDomains"])));
    let want = vec![vec![vec![Match { namespaces: vec![exact("bank")], ..Match::default() }]]];
    assert_eq!(get(&t, "pay/deny").rules(), want.as_slice());
}

#[test]
fn nulls_read_as_absent() {
    let spec = r#"
        selector: null
        targetRefs: null
        rules:
        - from: [{source: {namespaces: [bank], principals: null}}]
          to: null
          when: null
    "#;
    let t = translate(
        &[ap("shop", "p", spec)],
        &[pa("shop", "m", "selector: null\nmtls: {mode: null}\nportLevelMtls: null")],
    );
    assert!(t.refused().is_empty(), "{:?}", t.refused());
    let want = vec![one(Match { namespaces: vec![exact("bank")], ..Match::default() })];
    assert_eq!(*get(&t, "shop/p"), expected("shop/p", Scope::Namespace, Action::Allow, want));
    assert_eq!(t.workload_policies("shop", &app("web")), keys(&[]));
}

// `convertAuthorizationPolicy`'s dry-run annotation, read with Go's ParseBool.
#[test]
fn the_dry_run_annotation() {
    let t = translate(
        &[
            ap_dry_run("shop", "dry", "true", "action: DENY\nrules: [{}]"),
            ap_dry_run("shop", "dry-t", "T", "action: DENY\nrules: [{}]"),
            ap_dry_run("bank", "not-dry", "False", "action: DENY\nrules: [{}]"),
            ap_dry_run("pay", "unreadable", "yes", "action: DENY\nrules: [{}]"),
        ],
        &[],
    );
    assert!(get(&t, "shop/dry").dry_run() && get(&t, "shop/dry-t").dry_run());
    assert!(!get(&t, "bank/not-dry").dry_run() && !get(&t, "pay/unreadable").dry_run());
    let named = t.workload_policies("shop", &app("web"));
    let v =
        t.policies().evaluate(&from("a", "b", 80).facts(), DestinationView { namespace: "shop", policy_keys: &named });
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(v.dry_run, vec![DryRun::Deny("shop/dry".into()), DryRun::Deny("shop/dry-t".into())]);
    assert_eq!(decide_at(&t, "pay", &app("web"), &from("a", "b", 80)), denied_by("pay/unreadable"));
    let note = t.notes().iter().find(|n| n.key == "pay/unreadable").map(|n| n.note.clone());
    assert_eq!(note, Some(NoteKind::InvalidDryRun("yes".into())));
}

// ---- Malformed AuthorizationPolicies fail closed. ----

#[test]
fn a_malformed_allow_allows_nothing_in_its_scope() {
    let cases: Vec<(&str, TranslateError)> = vec![
        (
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]",
            TranslateError::Address { field: "ipBlocks".into(), value: "10.0.0.0/33".into() },
        ),
        (
            "rules: [{from: [{source: {notIpBlocks: [\"\"]}}]}]",
            TranslateError::Address { field: "notIpBlocks".into(), value: String::new() },
        ),
        (
            "rules: [{to: [{operation: {notPorts: [\"65536\"]}}]}]",
            TranslateError::Port { field: "notPorts".into(), value: "65536".into() },
        ),
        (
            "rules: [{when: [{key: destination.port, values: [\"-1\"]}]}]",
            TranslateError::Port { field: "when destination.port values".into(), value: "-1".into() },
        ),
        (
            "rules: [{when: [{key: source.ip, notValues: [not-an-ip]}]}]",
            TranslateError::Address { field: "when source.ip notValues".into(), value: "not-an-ip".into() },
        ),
        (
            "rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]",
            TranslateError::ServiceAccount { field: "serviceAccounts".into(), value: "a/b/c".into() },
        ),
        (
            "rules: [{from: [{source: {notServiceAccounts: [\"*\"]}}]}]",
            TranslateError::ServiceAccount { field: "notServiceAccounts".into(), value: "*".into() },
        ),
        ("rules: [{}, {from: []}]", TranslateError::Shape { rule: 1, problem: "`from` is empty" }),
        ("rules: [{from: [{}]}]", TranslateError::Shape { rule: 0, problem: "a `from` without `source`" }),
        ("rules: [{from: [{source: {}}]}]", TranslateError::Shape { rule: 0, problem: "an empty `from.source`" }),
        ("rules: [{to: []}]", TranslateError::Shape { rule: 0, problem: "`to` is empty" }),
        ("rules: [{to: [{operation: {}}]}]", TranslateError::Shape { rule: 0, problem: "an empty `to.operation`" }),
        ("rules: [{when: [{key: source.ip}]}]", TranslateError::Condition { rule: 0, key: "source.ip".into() }),
        ("rules: [{when: [{values: [x]}]}]", TranslateError::Condition { rule: 0, key: String::new() }),
    ];
    for (rules, error) in cases {
        let t = translate(&[ap("shop", "bad", &format!("{rules}\n"))], &[]);
        assert_eq!(t.refused().len(), 1, "{rules}");
        let r = &t.refused()[0];
        assert_eq!((&r.error, r.outcome), (&error, FailClosed::AllowNothing), "{rules}");
        assert_eq!(*get(&t, "shop/bad"), expected("shop/bad", Scope::Namespace, Action::Allow, vec![]), "{rules}");
        assert_eq!(decide_at(&t, "shop", &app("web"), &from("shop", "web", 80)), not_allowed(), "{rules}");
    }
}

#[test]
fn a_malformed_deny_denies_everything_in_its_scope() {
    let spec = "action: DENY\nselector: {matchLabels: {app: db}}\nrules: [{to: [{operation: {ports: [\"99999\"]}}]}]";
    let t = translate(&[ap("shop", "bad", spec)], &[]);
    assert_eq!(t.refused()[0].outcome, FailClosed::DenyEverything);
    assert_eq!(*get(&t, "shop/bad"), expected("shop/bad", Scope::WorkloadSelector, Action::Deny, vec![vec![]]));
    assert_eq!(decide_at(&t, "shop", &app("db"), &from("shop", "web", 80)), denied_by("shop/bad"));
    assert_eq!(decide_at(&t, "shop", &app("db"), &plaintext(443)), denied_by("shop/bad"));
    assert!(allowed(&t, "shop", &app("web"), &from("shop", "web", 80)), "outside its selector");
}

#[test]
fn an_unknown_action_denies_everything_in_its_scope() {
    let t = translate(&[ap("shop", "typo", "action: DENYX\nrules: [{from: [{source: {namespaces: [bank]}}]}]")], &[]);
    let r = &t.refused()[0];
    assert_eq!((&r.error, r.outcome), (&TranslateError::UnknownAction("DENYX".into()), FailClosed::DenyEverything));
    assert_eq!(decide_at(&t, "shop", &app("web"), &from("shop", "web", 80)), denied_by("shop/typo"));
    let t = translate(&[ap("shop", "number", "action: 1")], &[]);
    assert_eq!(t.refused()[0].error, TranslateError::UnknownAction("1".into()));
}

#[test]
fn a_spec_that_does_not_deserialize_fails_closed_by_what_can_be_read() {
    // The action and selector are readable: an ALLOW of nothing for app=db.
    let t = translate(&[ap("shop", "allow", "selector: {matchLabels: {app: db}}\nrules: everything")], &[]);
    let r = &t.refused()[0];
    assert!(matches!(r.error, TranslateError::Spec(_)), "{:?}", r.error);
    assert_eq!(r.outcome, FailClosed::AllowNothing);
    assert_eq!(get(&t, "shop/allow").scope(), Scope::WorkloadSelector);
    assert_eq!(decide_at(&t, "shop", &app("db"), &from("shop", "web", 80)), not_allowed());
    assert!(allowed(&t, "shop", &app("web"), &from("shop", "web", 80)));
    // An unreadable selector: the whole namespace.
    let t = translate(&[ap("shop", "deny", "action: DENY\nselector: app=db\nrules: [{}]")], &[]);
    assert_eq!(t.refused()[0].outcome, FailClosed::DenyEverything);
    assert_eq!(decide_at(&t, "shop", &app("web"), &from("shop", "web", 80)), denied_by("shop/deny"));
    // An unreadable CUSTOM, or waypoint, policy is still not for ztunnel.
    let t = translate(
        &[
            ap("shop", "custom", "action: CUSTOM\nrules: 7"),
            ap("shop", "waypoint", "targetRefs: [{name: wp}]\nrules: 7"),
        ],
        &[],
    );
    assert!(t.policies().is_empty() && t.refused().is_empty());
    assert_eq!(t.notes().len(), 2);
}

#[test]
fn an_object_without_a_usable_name_is_refused() {
    let mut nameless = ap("shop", "x", "rules: [{}]");
    nameless.metadata.namespace = None;
    let t = translate(&[nameless], &[]);
    assert!(t.policies().is_empty());
    let r = &t.refused()[0];
    assert_eq!((r.key.as_str(), r.outcome), ("/x", FailClosed::Nothing));
    assert!(matches!(r.error, TranslateError::Policy(PolicyError::BadName { field: "namespace", .. })));
}

// ---- PeerAuthentication: precedence, the default, malformed objects. ----

#[test]
fn the_oldest_policy_of_each_level_wins() {
    let older = "2024-01-01T00:00:00Z";
    let newer = "2025-01-01T00:00:00Z";
    let namespace_level = |strict_at: &str, permissive_at: &str| {
        let peer = [
            pa_created("shop", "strict", strict_at, "mtls: {mode: STRICT}"),
            pa_created("shop", "permissive", permissive_at, "mtls: {mode: PERMISSIVE}"),
        ];
        translate(&[], &peer).workload_policies("shop", &app("web"))
    };
    assert_eq!(namespace_level(older, newer), keys(&[STATIC]));
    assert_eq!(namespace_level(newer, older), keys(&[]));
    let workload_level = |strict_at: &str, disable_at: &str| {
        let peer = [
            pa_created("shop", "strict", strict_at, "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}"),
            pa_created("shop", "disable", disable_at, "selector: {matchLabels: {tier: front}}\nmtls: {mode: DISABLE}"),
        ];
        translate(&[], &peer).workload_policies("shop", &labels(&[("app", "web"), ("tier", "front")]))
    };
    assert_eq!(workload_level(older, newer), keys(&[STATIC]));
    assert_eq!(workload_level(newer, older), keys(&[]));
}

#[test]
fn a_narrower_mode_overrides_a_wider_one() {
    let peer = [
        pa(ROOT, "mesh", "mtls: {mode: STRICT}"),
        pa("shop", "ns", "mtls: {mode: PERMISSIVE}"),
        pa("bank", "ns", "mtls: {mode: UNSET}"),
        pa("bank", "legacy", "selector: {matchLabels: {app: legacy}}\nmtls: {mode: DISABLE}"),
        pa("pay", "front", "selector: {matchLabels: {app: front}}\nmtls: {mode: PERMISSIVE}"),
    ];
    let t = translate(&[], &peer);
    assert_eq!(t.workload_policies("shop", &app("web")), keys(&[]), "namespace PERMISSIVE under a STRICT mesh");
    assert_eq!(t.workload_policies("bank", &app("web")), keys(&[STATIC]), "namespace UNSET inherits the mesh");
    assert_eq!(t.workload_policies("bank", &app("legacy")), keys(&[]), "workload DISABLE");
    assert_eq!(t.workload_policies("pay", &app("front")), keys(&[]), "workload PERMISSIVE");
    assert_eq!(t.workload_policies("pay", &app("back")), keys(&[STATIC]));
    assert_eq!(t.workload_policies(ROOT, &app("istiod")), keys(&[STATIC]), "the root namespace's own workloads");
    // Evaluated: plaintext only where STRICT.
    assert_eq!(decide_at(&t, "bank", &app("web"), &plaintext(80)), denied_by(STATIC));
    assert!(allowed(&t, "bank", &app("web"), &from("shop", "web", 80)));
    assert!(allowed(&t, "bank", &app("legacy"), &plaintext(80)));
}

#[test]
fn the_default_mode_applies_where_no_peer_authentication_sets_one() {
    let strict = |peer: &[DynamicObject]| Translation::new(ROOT, MtlsMode::Strict, &[], peer);
    let t = strict(&[]);
    assert_eq!(t.workload_policies("shop", &app("web")), keys(&[STATIC]));
    assert_eq!(decide_at(&t, "shop", &app("web"), &plaintext(80)), denied_by(STATIC));
    assert!(allowed(&t, "shop", &app("web"), &from("bank", "teller", 80)));
    let t = strict(&[pa(ROOT, "mesh", "mtls: {mode: PERMISSIVE}")]);
    assert_eq!(t.workload_policies("shop", &app("web")), keys(&[]));
    let t = strict(&[pa(ROOT, "mesh", "mtls: {mode: UNSET}"), pa("shop", "ns", "mtls: {mode: DISABLE}")]);
    assert_eq!(t.workload_policies("shop", &app("web")), keys(&[]));
    assert_eq!(t.workload_policies("bank", &app("web")), keys(&[STATIC]), "UNSET inherits the default");
    // PERMISSIVE by default: no static policy until a PeerAuthentication exists.
    let t = translate(&[], &[]);
    assert!(t.policies().is_empty());
    assert_eq!(t.workload_policies("shop", &app("web")), keys(&[]));
}

#[test]
fn port_level_modes_as_evaluated() {
    let peer = [
        pa("shop", "ns", "mtls: {mode: STRICT}"),
        pa("shop", "db", "selector: {matchLabels: {app: db}}\nportLevelMtls: {\"9090\": {mode: PERMISSIVE}}"),
        pa(
            "bank",
            "teller",
            "selector: {matchLabels: {app: teller}}\nmtls: {mode: PERMISSIVE}\nportLevelMtls: {\"8443\": {mode: STRICT}}",
        ),
    ];
    let t = translate(&[], &peer);
    assert!(allowed(&t, "shop", &app("db"), &plaintext(9090)), "the exempted port");
    assert_eq!(decide_at(&t, "shop", &app("db"), &plaintext(8080)), denied_by("shop/converted_peer_authentication_db"));
    assert!(allowed(&t, "shop", &app("db"), &from("bank", "teller", 8080)));
    assert_eq!(
        decide_at(&t, "bank", &app("teller"), &plaintext(8443)),
        denied_by("bank/converted_peer_authentication_teller")
    );
    assert!(allowed(&t, "bank", &app("teller"), &plaintext(8080)));
}

// Two cases where istiod names a converted policy it does not build (the workload then has no
// strictness at all); here the parent mode is inherited consistently and the policy exists.
#[test]
fn converted_policies_istiod_would_leave_out_are_built() {
    // A PERMISSIVE workload with a STRICT port, under a STRICT mesh.
    let t = translate(
        &[],
        &[
            pa(ROOT, "mesh", "mtls: {mode: STRICT}"),
            pa(
                "shop",
                "w",
                "selector: {matchLabels: {app: a}}\nmtls: {mode: PERMISSIVE}\nportLevelMtls: {\"9090\": {mode: STRICT}}",
            ),
        ],
    );
    let key = "shop/converted_peer_authentication_w";
    assert_eq!(t.workload_policies("shop", &app("a")), keys(&[key]));
    assert_eq!(decide_at(&t, "shop", &app("a"), &plaintext(9090)), denied_by(key));
    assert!(allowed(&t, "shop", &app("a"), &plaintext(8080)));
    // An UNSET workload with a PERMISSIVE port, under an UNSET namespace and a STRICT mesh.
    let t = translate(
        &[],
        &[
            pa(ROOT, "mesh", "mtls: {mode: STRICT}"),
            pa("shop", "ns", "mtls: {mode: UNSET}"),
            pa("shop", "w", "selector: {matchLabels: {app: a}}\nportLevelMtls: {\"9090\": {mode: PERMISSIVE}}"),
        ],
    );
    assert_eq!(t.workload_policies("shop", &app("a")), keys(&[key]));
    assert!(allowed(&t, "shop", &app("a"), &plaintext(9090)));
    assert_eq!(decide_at(&t, "shop", &app("a"), &plaintext(8080)), denied_by(key));
}

// As istiod: under an inherited STRICT, only a PERMISSIVE port exempts an UNSET workload; a
// DISABLE port stays STRICT (the static policy is named, the converted one is not).
#[test]
fn a_disable_port_of_an_unset_workload_under_strict_stays_strict() {
    let t = translate(
        &[],
        &[
            pa("shop", "ns", "mtls: {mode: STRICT}"),
            pa("shop", "w", "selector: {matchLabels: {app: a}}\nportLevelMtls: {\"9090\": {mode: DISABLE}}"),
        ],
    );
    assert_eq!(t.workload_policies("shop", &app("a")), keys(&[STATIC]));
    assert_eq!(decide_at(&t, "shop", &app("a"), &plaintext(9090)), denied_by(STATIC));
}

#[test]
fn a_malformed_peer_authentication_is_strict_in_its_scope() {
    let cases: Vec<(DynamicObject, TranslateError, &str)> = vec![
        (pa("shop", "typo", "mtls: {mode: STRICTEST}"), TranslateError::Spec(String::new()), "namespace"),
        (
            pa(
                "shop",
                "port0",
                "selector: {matchLabels: {app: a}}\nmtls: {mode: DISABLE}\nportLevelMtls: {\"0\": {mode: DISABLE}}",
            ),
            TranslateError::PortLevelPort(0),
            "workload",
        ),
        (
            pa(
                "shop",
                "nonnumeric",
                "selector: {matchLabels: {app: a}}\nmtls: {mode: DISABLE}\nportLevelMtls: {http: {mode: DISABLE}}",
            ),
            TranslateError::Spec(String::new()),
            "workload",
        ),
        (
            pa("shop", "no-selector", "mtls: {mode: PERMISSIVE}\nportLevelMtls: {\"80\": {mode: DISABLE}}"),
            TranslateError::PortLevelWithoutSelector,
            "namespace",
        ),
    ];
    for (object, error, scope) in cases {
        let name = object.metadata.name.clone().unwrap_or_default();
        let t = translate(&[], &[pa(ROOT, "mesh", "mtls: {mode: PERMISSIVE}"), object]);
        let r = &t.refused()[0];
        assert_eq!(
            (r.key.clone(), r.kind, r.outcome),
            (format!("shop/{name}"), ObjectKind::PeerAuthentication, FailClosed::Strict)
        );
        match (&r.error, &error) {
            (TranslateError::Spec(_), TranslateError::Spec(_)) => {}
            (got, want) => assert_eq!(got, want, "{name}"),
        }
        assert_eq!(t.workload_policies("shop", &app("a")), keys(&[STATIC]), "{name}");
        assert_eq!(decide_at(&t, "shop", &app("a"), &plaintext(80)), denied_by(STATIC), "{name}");
        let others = if scope == "namespace" { keys(&[STATIC]) } else { keys(&[]) };
        assert_eq!(t.workload_policies("shop", &app("b")), others, "{name}");
        assert_eq!(t.workload_policies("bank", &app("a")), keys(&[]), "{name}");
    }
}

#[test]
fn every_converted_key_a_workload_names_exists() {
    let modes = ["", "mtls: {mode: STRICT}\n", "mtls: {mode: PERMISSIVE}\n", "mtls: {mode: DISABLE}\n"];
    let ports = ["STRICT", "PERMISSIVE", "DISABLE", "UNSET"];
    let mut seen = BTreeSet::new();
    for mesh in modes {
        for ns in modes {
            for workload in modes {
                for port in ports {
                    let peer = [
                        pa(ROOT, "mesh", mesh),
                        pa("shop", "ns", ns),
                        pa(
                            "shop",
                            "w",
                            &format!(
                                "selector: {{matchLabels: {{app: a}}}}\n{workload}portLevelMtls: {{\"9090\": {{mode: {port}}}}}"
                            ),
                        ),
                    ];
                    let t = translate(&[], &peer);
                    let named = t.workload_policies("shop", &app("a"));
                    for key in &named {
                        assert!(t.policies().get(key).is_some(), "{key} for {mesh:?} {ns:?} {workload:?} {port}");
                    }
                    seen.insert(named);
                }
            }
        }
    }
    // The three outcomes all occur: nothing, the static policy, the converted one.
    assert_eq!(seen.len(), 3, "{seen:?}");
}
