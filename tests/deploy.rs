//! The manifests in deploy/base and the deploy/istio overlay, rendered as kustomize does and
//! parsed into Kubernetes API types: they must be valid objects and say what the daemon needs
//! (and, for the base's RBAC, see tests/kubernetes.rs which checks the rules against the
//! requests a running daemon makes). Each check of the overlay is also run against a copy
//! broken on purpose, and must fail there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::CommandFactory;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn deploy_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name)
}

/// Every object of deploy/base, as YAML values (in file order).
pub fn objects() -> Result<Vec<serde_yaml::Value>> {
    kustomize::render(&deploy_dir("base"))
}

/// Every object of the deploy/istio overlay, as kustomize renders it.
fn istio_objects() -> Result<Vec<serde_yaml::Value>> {
    kustomize::render(&deploy_dir("istio"))
}

/// The small part of `kustomize build` these manifests use, done as kustomize does it:
/// resources (files, or a directory that is itself a kustomization), strategic-merge patches
/// (before the namespace, as kustomize orders its transformers), the namespace, and labels
/// on metadata only. Anything else is an error, never silently ignored; `kubectl kustomize`
/// renders the same (deploy/README.md).
mod kustomize {
    use std::path::Path;

    use anyhow::{Context, Result, bail, ensure};
    use serde::Deserialize;
    use serde_yaml::{Mapping, Value};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Kustomization {
        api_version: String,
        kind: String,
        namespace: Option<String>,
        resources: Vec<String>,
        #[serde(default)]
        patches: Vec<PatchRef>,
        #[serde(default)]
        labels: Vec<Labels>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PatchRef {
        path: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Labels {
        pairs: Mapping,
        include_selectors: bool,
    }

    /// Kinds without a namespace (those these manifests use).
    const CLUSTER_SCOPED: [&str; 3] = ["Namespace", "ClusterRole", "ClusterRoleBinding"];

    /// Lists merged element by element, by this key (their `patchMergeKey` in the Kubernetes
    /// API); every other list the patches touch is replaced whole, and must be in `REPLACED`.
    const MERGE_KEYS: [(&str, &str); 4] =
        [("containers", "name"), ("env", "name"), ("volumes", "name"), ("volumeMounts", "mountPath")];
    const REPLACED: [&str; 5] = ["rules", "subjects", "sources", "args", "tolerations"];

    fn read_docs(path: &Path) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).with_context(|| format!("{}: not YAML", path.display())))
            .collect()
    }

    pub fn render(dir: &Path) -> Result<Vec<Value>> {
        let file = dir.join("kustomization.yaml");
        let k: Kustomization = serde_yaml::from_str(&std::fs::read_to_string(&file)?)
            .with_context(|| format!("{}: not a kustomization this renderer knows", file.display()))?;
        ensure!(
            (k.api_version.as_str(), k.kind.as_str()) == ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
            "{}: a {} {}",
            file.display(),
            k.api_version,
            k.kind
        );
        let mut out = Vec::new();
        for r in &k.resources {
            let path = dir.join(r);
            out.extend(if path.is_dir() { render(&path)? } else { read_docs(&path)? });
        }
        for p in &k.patches {
            for patch in read_docs(&dir.join(&p.path))? {
                apply(&mut out, &patch).with_context(|| format!("patch {}", p.path))?;
            }
        }
        for o in &mut out {
            let kind = o["kind"].as_str().unwrap_or_default().to_owned();
            let meta = o.get_mut("metadata").and_then(|m| m.as_mapping_mut()).context("an object without metadata")?;
            if let Some(ns) = &k.namespace {
                // kustomize would rename it: not done here.
                ensure!(
                    kind != "Namespace" || meta.get("name") == Some(&ns.as_str().into()),
                    "a Namespace other than {ns}"
                );
                if !CLUSTER_SCOPED.contains(&kind.as_str()) {
                    meta.insert("namespace".into(), ns.clone().into());
                }
            }
            for l in &k.labels {
                ensure!(!l.include_selectors, "labels with includeSelectors are not done here");
                let labels = meta.entry("labels".into()).or_insert_with(|| Mapping::new().into());
                let labels = labels.as_mapping_mut().context("metadata.labels is not a map")?;
                labels.extend(l.pairs.clone());
            }
        }
        Ok(out)
    }

    /// One strategic-merge patch: its kind, name and namespace (if it gives one) name exactly
    /// one object, which it merges into, or deletes (`$patch: delete`).
    fn apply(objects: &mut Vec<Value>, patch: &Value) -> Result<()> {
        let id = |o: &Value| (o["kind"].clone(), o["metadata"]["name"].clone(), o["metadata"]["namespace"].clone());
        let target = id(patch);
        let found: Vec<usize> = (0..objects.len()).filter(|&i| id(&objects[i]) == target).collect();
        let [i] = found[..] else { bail!("{target:?} names {} objects, not one", found.len()) };
        let mut patch = patch.as_mapping().context("a patch is not a map")?.clone();
        match patch.remove("$patch") {
            None => merge(&mut objects[i], &Value::Mapping(patch), ""),
            Some(d) if d == "delete" => {
                objects.remove(i);
                Ok(())
            }
            Some(d) => bail!("$patch: {d:?} is not done here"),
        }
    }

    fn merge(target: &mut Value, patch: &Value, path: &str) -> Result<()> {
        let (Value::Mapping(t), Value::Mapping(p)) = (&mut *target, patch) else {
            ensure!(!has_directive(patch), "{path}: a directive where nothing is merged");
            *target = patch.clone();
            return Ok(());
        };
        for (k, v) in p {
            let key = k.as_str().context("a key that is not a string")?;
            let here = format!("{path}.{key}");
            ensure!(!key.starts_with('$'), "{here}: directive not done here");
            match (t.get_mut(k), v) {
                (_, Value::Null) => {
                    ensure!(t.remove(k).is_some(), "{here}: deleted, but not there");
                }
                (Some(Value::Sequence(ts)), Value::Sequence(ps)) => merge_list(key, ts, ps, &here)?,
                (Some(tv), _) => merge(tv, v, &here)?,
                (None, _) => {
                    ensure!(!has_directive(v), "{here}: a directive in something new");
                    t.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(())
    }

    /// A keyed list: the patch's elements merge into those with the same key, `$patch:
    /// delete` removes one (which must be there), new ones come first (as kustomize puts
    /// them). Other lists are replaced.
    fn merge_list(field: &str, target: &mut Vec<Value>, patch: &[Value], path: &str) -> Result<()> {
        let Some(&(_, key)) = MERGE_KEYS.iter().find(|(f, _)| *f == field) else {
            ensure!(REPLACED.contains(&field), "{path}: how kustomize merges this list is not known here");
            ensure!(!patch.iter().any(has_directive), "{path}: a directive in a replaced list");
            *target = patch.to_vec();
            return Ok(());
        };
        let mut added = Vec::new();
        for p in patch {
            let k = &p[key];
            ensure!(!k.is_null(), "{path}: an element without its key {key}");
            let at = target.iter().position(|t| &t[key] == k);
            let mut element = p.as_mapping().context("a list element that is not a map")?.clone();
            match (element.remove("$patch"), at) {
                (Some(d), Some(i)) if d == "delete" => {
                    target.remove(i);
                }
                (Some(d), _) => bail!("{path}: $patch: {d:?} on {key} {k:?} (not there, or not done here)"),
                (None, Some(i)) => merge(&mut target[i], p, &format!("{path}[{key}={k:?}]"))?,
                (None, None) => {
                    ensure!(!has_directive(p), "{path}: a directive in something new");
                    added.push(p.clone());
                }
            }
        }
        target.splice(0..0, added);
        Ok(())
    }

    fn has_directive(v: &Value) -> bool {
        match v {
            Value::Mapping(m) => {
                m.iter().any(|(k, v)| k.as_str().is_some_and(|k| k.starts_with('$')) || has_directive(v))
            }
            Value::Sequence(s) => s.iter().any(has_directive),
            _ => false,
        }
    }
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
    the_daemonset_runs_with_what_the_daemon_needs(&objects()?)
}

fn the_daemonset_runs_with_what_the_daemon_needs(objects: &[serde_yaml::Value]) -> Result<()> {
    let ds: DaemonSet = one(objects, "DaemonSet")?;
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

#[test]
fn the_daemonset_keeps_the_cni_plugin_chained_on_every_node() -> Result<()> {
    for objects in [objects()?, istio_objects()?] {
        cni_installer(&objects)?;
    }
    Ok(())
}

/// The `install-cni` container runs `meshpath cni install --watch` with the host's CNI
/// directories where the installer's defaults look, and only variables the installer reads.
fn cni_installer(objects: &[serde_yaml::Value]) -> Result<()> {
    let pod = pod_spec(objects)?;
    let c = pod.containers.iter().find(|c| c.name == "install-cni").context("no install-cni container")?;
    ensure!(c.args.as_deref() == Some(&["cni".into(), "install".into(), "--watch".into()][..]), "{:?}", c.args);
    let cmd = meshpath::cli::Cli::command();
    let install = cmd.find_subcommand("cni").and_then(|c| c.find_subcommand("install")).context("cni install")?;
    let reads: BTreeMap<String, Option<String>> = install
        .get_arguments()
        .filter_map(|a| {
            let default = a.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
            Some((a.get_env()?.to_string_lossy().into_owned(), default))
        })
        .collect();
    for e in c.env.iter().flatten() {
        ensure!(reads.contains_key(&e.name), "{} is set but `meshpath cni install` reads no such variable", e.name);
    }
    for (var, dir) in [("MESHPATH_CNI_BIN_DIR", "/opt/cni/bin"), ("MESHPATH_CNI_CONF_DIR", "/etc/cni/net.d")] {
        ensure!(reads.get(var) == Some(&Some(dir.to_owned())), "{var}'s default is not {dir}: {:?}", reads.get(var));
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == dir)
            .with_context(|| format!("{dir} not mounted"))?;
        let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).context("no volume")?;
        ensure!(volume.host_path.as_ref().map(|h| h.path.as_str()) == Some(dir), "{dir} is not the host's: {volume:?}");
    }
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
    configured_variables_are_flags(&objects()?)?;
    configured_variables_are_flags(&istio_objects()?)
}

/// The DaemonSet's container, its ConfigMap, and what the two set.
struct Settings {
    container: Container,
    config: BTreeMap<String, String>,
}

impl Settings {
    fn of(objects: &[serde_yaml::Value]) -> Result<Self> {
        let ds: DaemonSet = one(objects, "DaemonSet")?;
        let container = ds.spec.template.spec.context("pod spec")?.containers[0].clone();
        let cm: ConfigMap = one(objects, "ConfigMap")?;
        // The ConfigMap only matters if the daemon's container loads it.
        let loads = container
            .env_from
            .iter()
            .flatten()
            .any(|e| e.config_map_ref.as_ref().map(|c| &c.name) == cm.metadata.name.as_ref());
        ensure!(loads, "the DaemonSet does not load the {:?} ConfigMap into its environment", cm.metadata.name);
        Ok(Self { container, config: cm.data.unwrap_or_default() })
    }

    /// Every variable set, by the ConfigMap or the container's own `env`.
    fn names(&self) -> BTreeSet<String> {
        let env = self.container.env.iter().flatten().map(|e| e.name.clone());
        self.config.keys().cloned().chain(env).collect()
    }

    /// What the daemon reads for `var`: the container's value, the ConfigMap's, or the flag's default.
    fn value(&self, var: &str) -> Result<String> {
        if let Some(e) = self.container.env.iter().flatten().find(|e| e.name == var) {
            return e.value.clone().with_context(|| format!("{var} is not a plain value"));
        }
        if let Some(v) = self.config.get(var) {
            return Ok(v.clone());
        }
        node_default(var).with_context(|| format!("{var} is neither set nor a flag with a default"))
    }

    /// The downward API field `var` comes from.
    fn field(&self, var: &str) -> Option<String> {
        let e = self.container.env.iter().flatten().find(|e| e.name == var)?;
        e.value_from.as_ref()?.field_ref.as_ref().map(|f| f.field_path.clone())
    }
}

/// The default of the `meshpath node` flag read from `var`.
fn node_default(var: &str) -> Option<String> {
    let cmd = meshpath::cli::Cli::command();
    let node = cmd.find_subcommand("node")?;
    let arg = node.get_arguments().find(|a| a.get_env().is_some_and(|e| e == var))?;
    arg.get_default_values().first().map(|d| d.to_string_lossy().into_owned())
}

fn configured_variables_are_flags(objects: &[serde_yaml::Value]) -> Result<()> {
    let known = node_env_names();
    ensure!(known.len() > 10, "clap reports too few variables to check against: {known:?}");
    let settings = Settings::of(objects)?;
    ensure!(settings.config.len() >= 3, "the ConfigMap configures nothing: {:?}", settings.config);
    for name in settings.names() {
        if !known.contains(&name) {
            bail!("{name} is set in deploy/ but `meshpath node` reads no such variable (known: {known:?})");
        }
    }
    Ok(())
}

// ---- deploy/istio: meshpath in the place of ztunnel and istio-cni -------------------------

const ISTIO_NAMESPACE: &str = "istio-system";
/// The account istiod trusts for impersonation by default (CA_TRUSTED_NODE_ACCOUNTS).
const TRUSTED_ACCOUNT: &str = "ztunnel";

fn pod_spec(objects: &[serde_yaml::Value]) -> Result<PodSpec> {
    let ds: DaemonSet = one(objects, "DaemonSet")?;
    ds.spec.template.spec.context("pod spec")
}

/// The volume mounted at `dir` in the daemon's container.
fn volume_at(objects: &[serde_yaml::Value], dir: &Path) -> Result<Volume> {
    let pod = pod_spec(objects)?;
    let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
    let mount = mounts.iter().find(|m| Path::new(&m.mount_path) == dir).with_context(|| {
        format!(
            "nothing is mounted at {} (mounts: {:?})",
            dir.display(),
            mounts.iter().map(|m| &m.mount_path).collect::<Vec<_>>()
        )
    })?;
    pod.volumes
        .into_iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .with_context(|| format!("no volume {}", mount.name))
}

/// A file the daemon reads (`var`'s value): its directory and its name there.
fn file_of(settings: &Settings, var: &str) -> Result<(PathBuf, String)> {
    let path = PathBuf::from(settings.value(var)?);
    let name = path.file_name().context("not a file")?.to_string_lossy().into_owned();
    Ok((path.parent().context("no directory")?.to_owned(), name))
}

/// Runs as istiod's trusted node account, in istio-system, which the overlay does not own.
fn check_account(objects: &[serde_yaml::Value]) -> Result<()> {
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    let want: BTreeSet<&str> = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"].into();
    ensure!(kinds == want, "kinds {kinds:?}, want {want:?} (no Namespace: istio-system is Istio's)");
    let sa: ServiceAccount = one(objects, "ServiceAccount")?;
    let named = (sa.metadata.name.as_deref(), sa.metadata.namespace.as_deref());
    ensure!(named == (Some(TRUSTED_ACCOUNT), Some(ISTIO_NAMESPACE)), "the service account is {named:?}");
    let ds: DaemonSet = one(objects, "DaemonSet")?;
    ensure!(ds.metadata.namespace.as_deref() == Some(ISTIO_NAMESPACE), "{:?}", ds.metadata.namespace);
    let account = pod_spec(objects)?.service_account_name;
    ensure!(account.as_deref() == Some(TRUSTED_ACCOUNT), "the DaemonSet runs as {account:?}");
    let binding: ClusterRoleBinding = one(objects, "ClusterRoleBinding")?;
    let role: ClusterRole = one(objects, "ClusterRole")?;
    ensure!(Some(&binding.role_ref.name) == role.metadata.name.as_ref(), "{:?}", binding.role_ref);
    let subjects: Vec<_> =
        binding.subjects.iter().flatten().map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref())).collect();
    ensure!(
        subjects == [("ServiceAccount", TRUSTED_ACCOUNT, Some(ISTIO_NAMESPACE))],
        "the role is bound to {subjects:?}"
    );
    Ok(())
}

/// The projected token istiod authenticates, where AUTH_TOKEN says.
fn check_token(objects: &[serde_yaml::Value]) -> Result<()> {
    let (dir, file) = file_of(&Settings::of(objects)?, "AUTH_TOKEN")?;
    let volume = volume_at(objects, &dir)?;
    let sources = volume.projected.and_then(|p| p.sources).context("the token's volume is not projected")?;
    let token = sources.iter().find_map(|s| s.service_account_token.as_ref()).context("no service-account token")?;
    ensure!(token.audience.as_deref() == Some("istio-ca"), "the token's audience is {:?}", token.audience);
    ensure!(token.path == file, "the token is projected as {}, AUTH_TOKEN reads {file}", token.path);
    ensure!(token.expiration_seconds.is_some(), "the token's lifetime is not set (the chart's is 12 h)");
    Ok(())
}

/// The mesh root both clients check istiod against, from Istio's ConfigMap.
fn check_root(objects: &[serde_yaml::Value]) -> Result<()> {
    let settings = Settings::of(objects)?;
    for var in ["XDS_ROOT_CA", "CA_ROOT_CA"] {
        let (dir, file) = file_of(&settings, var)?;
        let volume = volume_at(objects, &dir).with_context(|| var.to_owned())?;
        let cm = volume.config_map.with_context(|| format!("{var}: its volume is not a ConfigMap"))?;
        ensure!(cm.name == "istio-ca-root-cert", "{var}: the root comes from ConfigMap {:?}", cm.name);
        // The ConfigMap's key is root-cert.pem; without `items` it is the file's name.
        ensure!(file == "root-cert.pem" && cm.items.is_none(), "{var} reads {file} ({:?})", cm.items);
    }
    Ok(())
}

fn check_host_network(objects: &[serde_yaml::Value]) -> Result<()> {
    let pod = pod_spec(objects)?;
    ensure!(pod.host_network == Some(true), "hostNetwork is {:?}", pod.host_network);
    ensure!(
        pod.dns_policy.as_deref() == Some("ClusterFirstWithHostNet"),
        "dnsPolicy {:?}: a host-network pod resolves istiod's name only with ClusterFirstWithHostNet",
        pod.dns_policy
    );
    Ok(())
}

/// istiod mode, the node proxy's pod from the downward API, and no built-in CA.
fn check_settings(objects: &[serde_yaml::Value]) -> Result<()> {
    let settings = Settings::of(objects)?;
    ensure!(settings.value("MESHPATH_CONTROL_PLANE")? == "istiod", "not in istiod mode");
    let known = node_env_names();
    let downward = [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("NODE_NAME", "spec.nodeName"),
        ("INSTANCE_IP", "status.podIP"),
    ];
    for (var, field) in downward {
        ensure!(known.contains(var), "`meshpath node` reads no {var}");
        let got = settings.field(var);
        ensure!(got.as_deref() == Some(field), "{var} comes from {got:?}, want the downward API's {field}");
    }
    for var in [
        "MESHPATH_CA_DIR",
        "MESHPATH_CERT_DIR",
        "MESHPATH_WORKLOADS",
        "MESHPATH_INBOUND_PLAINTEXT",
        "MESHPATH_ROOT_NAMESPACE",
    ] {
        ensure!(!settings.names().contains(var), "{var} is set: the daemon refuses it with istiod");
    }
    let pod = pod_spec(objects)?;
    let secrets: Vec<_> = pod.volumes.iter().flatten().filter(|v| v.secret.is_some()).map(|v| &v.name).collect();
    ensure!(secrets.is_empty(), "secret volumes {secrets:?}: no CA key belongs on a node under istiod");
    Ok(())
}

/// Exactly the requests of istiod mode: this node's pods and the namespaces, and the
/// annotation on pods' status; no Services or EndpointSlices.
fn check_rbac(objects: &[serde_yaml::Value]) -> Result<()> {
    let role: ClusterRole = one(objects, "ClusterRole")?;
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for g in rule.api_groups.iter().flatten() {
            for res in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((v.as_str(), g.as_str(), res.as_str()));
                }
            }
        }
        ensure!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
    }
    let want: BTreeSet<_> = [
        ("list", "", "pods"),
        ("watch", "", "pods"),
        ("list", "", "namespaces"),
        ("watch", "", "namespaces"),
        ("patch", "", "pods/status"),
        // The CNI plugin's: the pod of an ADD and its namespace.
        ("get", "", "pods"),
        ("get", "", "namespaces"),
    ]
    .into();
    ensure!(granted == want, "RBAC grants {granted:?}, istiod mode needs exactly {want:?}");
    Ok(())
}

fn check_istio(objects: &[serde_yaml::Value]) -> Result<()> {
    // Valid objects of their kinds, without a field their types do not know.
    let _: ConfigMap = one(objects, "ConfigMap")?;
    let _: DaemonSet = one(objects, "DaemonSet")?;
    check_account(objects)?;
    check_token(objects)?;
    check_root(objects)?;
    check_host_network(objects)?;
    check_settings(objects)?;
    check_rbac(objects)
}

#[test]
fn the_istio_overlay_runs_meshpath_as_istiod_expects_a_node_proxy() -> Result<()> {
    check_istio(&istio_objects()?)
}

/// The base's own checks hold for the overlay too (rolling takeover, probes, privileges).
#[test]
fn the_istio_overlay_keeps_what_the_daemon_needs() -> Result<()> {
    the_daemonset_runs_with_what_the_daemon_needs(&istio_objects()?)
}

/// One object of `kind` in `objects`, to break.
fn object_mut<'a>(objects: &'a mut [serde_yaml::Value], kind: &str) -> &'a mut serde_yaml::Value {
    objects.iter_mut().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

fn container_mut(objects: &mut [serde_yaml::Value]) -> &mut serde_yaml::Value {
    &mut object_mut(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
}

fn seq_mut(v: &mut serde_yaml::Value) -> &mut Vec<serde_yaml::Value> {
    v.as_sequence_mut().expect("a list")
}

/// Each check fails on a copy of the overlay broken in what it checks.
#[test]
fn each_istio_check_fails_on_a_broken_copy() -> Result<()> {
    type Breakage = fn(&mut [serde_yaml::Value]);
    let cases: [(&str, Breakage, &str); 10] = [
        (
            "account",
            |o| object_mut(o, "ServiceAccount")["metadata"]["name"] = "meshpath".into(),
            "the service account is",
        ),
        (
            "subject",
            |o| object_mut(o, "ClusterRoleBinding")["subjects"][0]["namespace"] = "meshpath-system".into(),
            "the role is bound to",
        ),
        (
            "audience",
            |o| {
                let pod = &mut object_mut(o, "DaemonSet")["spec"]["template"]["spec"];
                for v in seq_mut(&mut pod["volumes"]) {
                    if v["name"] == "istio-token" {
                        v["projected"]["sources"][0]["serviceAccountToken"]["audience"] = "kubernetes".into();
                    }
                }
            },
            "audience",
        ),
        (
            "token mount",
            |o| {
                for m in seq_mut(&mut container_mut(o)["volumeMounts"]) {
                    if m["name"] == "istio-token" {
                        m["mountPath"] = "/var/run/secrets/token".into();
                    }
                }
            },
            "nothing is mounted at /var/run/secrets/tokens",
        ),
        (
            "root",
            |o| {
                let pod = &mut object_mut(o, "DaemonSet")["spec"]["template"]["spec"];
                for v in seq_mut(&mut pod["volumes"]) {
                    if v["name"] == "istiod-ca-cert" {
                        v["configMap"]["name"] = "istio-root".into();
                    }
                }
            },
            "the root comes from ConfigMap",
        ),
        (
            "dnsPolicy",
            |o| object_mut(o, "DaemonSet")["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst".into(),
            "dnsPolicy",
        ),
        (
            "downward",
            |o| seq_mut(&mut container_mut(o)["env"]).retain(|e| e["name"] != "INSTANCE_IP"),
            "INSTANCE_IP comes from None",
        ),
        (
            "mode",
            |o| object_mut(o, "ConfigMap")["data"]["MESHPATH_CONTROL_PLANE"] = "standalone".into(),
            "not in istiod mode",
        ),
        (
            "ca secret",
            |o| {
                let pod = &mut object_mut(o, "DaemonSet")["spec"]["template"]["spec"];
                let ca: serde_yaml::Value =
                    serde_yaml::from_str("{name: ca, secret: {secretName: meshpath-ca}}").expect("yaml");
                seq_mut(&mut pod["volumes"]).push(ca);
            },
            "secret volumes",
        ),
        (
            "rbac",
            |o| {
                let rule: serde_yaml::Value =
                    serde_yaml::from_str("{apiGroups: [''], resources: [services], verbs: [list, watch]}")
                        .expect("yaml");
                seq_mut(&mut object_mut(o, "ClusterRole")["rules"]).push(rule);
            },
            "RBAC grants",
        ),
    ];
    let good = istio_objects()?;
    for (what, breakage, expected) in cases {
        let mut broken = good.clone();
        breakage(&mut broken);
        let err = match check_istio(&broken) {
            Ok(()) => bail!("{what}: the broken copy passed"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(err.contains(expected), "{what}: failed for another reason: {err}");
    }
    Ok(())
}

/// A directory removed when dropped, also when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("meshpath-deploy-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The renderer refuses what it does not do, rather than rendering something else.
#[test]
fn the_renderer_fails_on_what_it_does_not_do() -> Result<()> {
    let base = deploy_dir("base").canonicalize()?;
    let cases = [
        ("namePrefix: x-\n", "", "not a kustomization this renderer knows"),
        (
            "",
            "spec: {template: {spec: {containers: [{name: meshpath, envFrom: [{secretRef: {name: x}}]}]}}}",
            "how kustomize merges this list is not known here",
        ),
        ("", "spec: {template: {spec: {volumes: [{name: nope, $patch: delete}]}}}", "not there"),
        ("", "spec: {template: {spec: {hostNetwork: {$patch: replace}}}}", "directive"),
    ];
    for (i, (extra, patch, expected)) in cases.into_iter().enumerate() {
        let dir = TempDir::new(&i.to_string())?;
        let kustomization = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n{}resources: [{}]\npatches: [{{path: p.yaml}}]\n",
            extra,
            base.display()
        );
        std::fs::write(dir.0.join("kustomization.yaml"), kustomization)?;
        let patch = format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: meshpath, namespace: meshpath-system}}\n{patch}\n"
        );
        std::fs::write(dir.0.join("p.yaml"), patch)?;
        let err = match kustomize::render(&dir.0) {
            Ok(_) => bail!("case {i}: rendered"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(err.contains(expected), "case {i}: failed for another reason: {err}");
    }
    Ok(())
}
