//! The manifests in deploy/base, parsed into Kubernetes API types: they must be valid objects
//! and say what the daemon needs (and, for RBAC, see tests/kubernetes.rs which checks the
//! rules against the requests a running daemon makes).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::CommandFactory;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base")
}

/// Every object of the kustomization, as YAML values (in file order).
pub fn objects() -> Result<Vec<serde_yaml::Value>> {
    #[derive(Deserialize)]
    struct Kustomization {
        namespace: String,
        resources: Vec<String>,
    }
    let k: Kustomization = serde_yaml::from_str(&std::fs::read_to_string(base().join("kustomization.yaml"))?)?;
    let mut out = Vec::new();
    for file in &k.resources {
        let text = std::fs::read_to_string(base().join(file)).with_context(|| format!("reading {file}"))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v = serde_yaml::Value::deserialize(doc).with_context(|| format!("{file}: not YAML"))?;
            // As kustomize does: namespaced objects land in the kustomization's namespace.
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            if !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&kind.as_str())
                && let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_mapping_mut())
            {
                meta.insert("namespace".into(), k.namespace.clone().into());
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// The one object of `kind`, as its API type. Fields the type does not know (a misspelt
/// `mountPropagaton`, which a cluster would drop silently) are an error: what the type
/// writes back must hold every field of the manifest.
fn one<T: serde::de::DeserializeOwned + serde::Serialize>(objects: &[serde_yaml::Value], kind: &str) -> Result<T> {
    let found: Vec<_> = objects.iter().filter(|o| o["kind"] == kind).collect();
    ensure!(found.len() == 1, "want one {kind}, found {}", found.len());
    let typed: T =
        serde_yaml::from_value(found[0].clone()).with_context(|| format!("the {kind} is not a valid {kind}"))?;
    let mut unknown = Vec::new();
    fields_missing_from(found[0], &serde_yaml::to_value(&typed)?, kind, &mut unknown);
    ensure!(unknown.is_empty(), "fields the {kind} type does not know (misspelt?): {unknown:?}");
    Ok(typed)
}

/// Paths of `want` (a manifest) that `got` (its typed round trip) lacks.
fn fields_missing_from(want: &serde_yaml::Value, got: &serde_yaml::Value, path: &str, out: &mut Vec<String>) {
    use serde_yaml::Value;
    match (want, got) {
        (Value::Mapping(w), Value::Mapping(g)) => {
            for (k, v) in w {
                let key = k.as_str().unwrap_or("?");
                match g.get(k) {
                    Some(gv) => fields_missing_from(v, gv, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Sequence(w), Value::Sequence(g)) => {
            for (i, v) in w.iter().enumerate() {
                match g.get(i) {
                    Some(gv) => fields_missing_from(v, gv, &format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

#[test]
fn a_misspelt_field_is_caught() -> Result<()> {
    let mut objects = objects()?;
    let ds = objects.iter_mut().find(|o| o["kind"] == "DaemonSet").context("no DaemonSet")?;
    let spec = ds["spec"]["template"]["spec"].as_mapping_mut().context("pod spec")?;
    spec.insert("hostNetwrok".into(), true.into());
    let err = one::<DaemonSet>(&objects, "DaemonSet").expect_err("a misspelt field must fail").to_string();
    ensure!(err.contains("DaemonSet.spec.template.spec.hostNetwrok"), "{err}");
    Ok(())
}

#[test]
fn every_manifest_is_a_valid_object_of_its_kind() -> Result<()> {
    let objects = objects()?;
    let kinds: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap_or("?")).collect();
    ensure!(
        kinds == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"],
        "{kinds:?}"
    );
    let ns: Namespace = one(&objects, "Namespace")?;
    let _: ServiceAccount = one(&objects, "ServiceAccount")?;
    let binding: ClusterRoleBinding = one(&objects, "ClusterRoleBinding")?;
    let role: ClusterRole = one(&objects, "ClusterRole")?;
    ensure!(binding.role_ref.name == role.metadata.name.clone().unwrap_or_default());
    let subject = &binding.subjects.as_ref().context("no subjects")?[0];
    ensure!(subject.kind == "ServiceAccount" && subject.namespace == ns.metadata.name, "{subject:?}");
    Ok(())
}

#[test]
fn the_daemonset_runs_on_every_node_with_what_the_daemon_needs() -> Result<()> {
    let objects = objects()?;
    let ds: DaemonSet = one(&objects, "DaemonSet")?;
    let spec = ds.spec;
    let pod = spec.template.spec.context("pod spec")?;
    ensure!(pod.host_network == Some(true), "the datapath lives in the node's network namespace");
    ensure!(
        pod.tolerations.iter().flatten().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint"
    );
    let rolling = spec.update_strategy.and_then(|u| u.rolling_update).context("rolling update")?;
    ensure!(
        rolling.max_surge == Some(IntOrString::Int(1)) && rolling.max_unavailable == Some(IntOrString::Int(0)),
        "the new pod takes the node over from the old one: maxSurge 1, maxUnavailable 0 ({rolling:?})"
    );
    // Linger (2 s) and the default drain (5 s), after at most a drain timeout's wait for
    // the successor.
    ensure!(pod.termination_grace_period_seconds >= Some(12), "{:?}", pod.termination_grace_period_seconds);
    let c = &pod.containers[0];
    // Host ports would keep the surge pod off the node.
    ensure!(
        c.ports.as_ref().is_none_or(|p| p.iter().all(|p| p.host_port.is_none())) && c.ports.is_none(),
        "{:?}",
        c.ports
    );
    ensure!(c.security_context.as_ref().and_then(|s| s.privileged) == Some(true));
    let probe = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).context("readiness probe")?;
    ensure!(probe.path.as_deref() == Some("/healthz/ready") && probe.port == IntOrString::Int(15021), "{probe:?}");
    let mounts: BTreeSet<&str> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    ensure!(mounts.contains("/sys/fs/bpf") && mounts.contains("/run/meshpath"), "{mounts:?}");
    let res = c.resources.as_ref().context("resources")?;
    ensure!(res.requests.is_some() && res.limits.as_ref().is_some_and(|l| l.contains_key("memory")), "{res:?}");
    // The node's name comes from the downward API.
    let node_env = c.env.iter().flatten().find(|e| e.name == "MESHPATH_NODE").context("MESHPATH_NODE")?;
    ensure!(
        node_env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str())
            == Some("spec.nodeName"),
        "{node_env:?}"
    );
    ensure!(c.args.as_deref() == Some(&["node".to_string()][..]), "{:?}", c.args);
    Ok(())
}

/// Environment variables `meshpath node` reads (clap's `env` names).
fn node_env_names() -> BTreeSet<String> {
    let cmd = meshpath::cli::Cli::command();
    let node = cmd.find_subcommand("node").expect("node subcommand");
    node.get_arguments()
        .chain(cmd.get_arguments())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

#[test]
fn every_configured_variable_is_a_flag_of_the_daemon() -> Result<()> {
    let objects = objects()?;
    let cm: ConfigMap = one(&objects, "ConfigMap")?;
    let known = node_env_names();
    ensure!(known.len() > 10, "clap reports too few variables to check against: {known:?}");
    let mut set: Vec<String> = cm.data.clone().unwrap_or_default().into_keys().collect();
    ensure!(set.len() >= 3, "the ConfigMap configures nothing: {set:?}");
    let ds: DaemonSet = one(&objects, "DaemonSet")?;
    let pod = ds.spec.template.spec.context("pod spec")?;
    let container = &pod.containers[0];
    // The ConfigMap only matters if the daemon's container loads it.
    let loads = container
        .env_from
        .iter()
        .flatten()
        .any(|e| e.config_map_ref.as_ref().map(|c| &c.name) == cm.metadata.name.as_ref());
    ensure!(loads, "the DaemonSet does not load the {:?} ConfigMap into its environment", cm.metadata.name);
    set.extend(container.env.iter().flatten().map(|e| e.name.clone()));
    for name in &set {
        if !known.contains(name) {
            bail!("{name} is set in deploy/ but `meshpath node` reads no such variable (known: {known:?})");
        }
    }
    Ok(())
}
