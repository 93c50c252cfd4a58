//! `meshpath cni install|uninstall`: puts the plugin binary into the host's CNI bin dir and
//! chains it last into the pod network's configuration (the file the runtime reads: the
//! first in name order), writing the kubeconfig it decides with; with `--watch` it puts the
//! entry back whenever the primary CNI rewrites its file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use meshpath_common::names::CNI_PLUGIN;

use crate::drain;

/// Where the plugin decides enrolment from.
#[derive(Clone, Debug)]
pub enum Decider {
    /// This kubeconfig, used as it is.
    Kubeconfig(PathBuf),
    /// A kubeconfig written into the conf dir from the pod's service account.
    ServiceAccount,
    Workloads(PathBuf),
}

#[derive(Clone, Debug)]
pub struct InstallConfig {
    pub node: String,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub decider: Decider,
    pub exclude_namespaces: Vec<String>,
    pub timeout_secs: u64,
    /// The plugin binary to copy (`meshpath-cni` beside this binary).
    pub plugin: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a CNI configuration: {why}", path.display())]
    Config { path: PathBuf, why: String },
    #[error("no CNI configuration in {} yet (the pod network's plugin writes one)", .0.display())]
    NoPrimary(PathBuf),
    #[error("reading the service account's {what}: {source} (run in a pod, or give --kubeconfig or --workloads)")]
    ServiceAccount { what: &'static str, source: std::io::Error },
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const KUBECONFIG_NAME: &str = "meshpath-cni.kubeconfig";
/// How often `--watch` looks at the configuration: a stat of one file.
const WATCH_EVERY: Duration = Duration::from_secs(2);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_owned(), source }
}

/// The file the runtime reads: the first `.conf`, `.conflist` or `.json` in name order.
pub fn primary(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| InstallError::NoPrimary(conf_dir.to_owned()))
}

/// The plugin's entry in the chain.
pub fn entry(cfg: &InstallConfig) -> Value {
    let mut e = json!({
        "type": CNI_PLUGIN,
        "node": cfg.node,
        "exclude_namespaces": cfg.exclude_namespaces,
        "timeout_secs": cfg.timeout_secs,
    });
    let (key, path) = match &cfg.decider {
        Decider::Workloads(p) => ("workloads", p.clone()),
        Decider::Kubeconfig(p) => ("kubeconfig", p.clone()),
        Decider::ServiceAccount => ("kubeconfig", cfg.conf_dir.join(KUBECONFIG_NAME)),
    };
    e[key] = json!(path);
    e
}

/// `conf` (a conflist, or a single plugin's conf made into one) with meshpath's entry last,
/// replacing any earlier one of it.
pub fn with_plugin(conf: Value, entry: &Value) -> Result<Value, String> {
    let mut list = as_list(conf)?;
    let plugins = list["plugins"].as_array_mut().ok_or("\"plugins\" is not a list")?;
    plugins.retain(|p| p["type"] != CNI_PLUGIN);
    plugins.push(entry.clone());
    Ok(list)
}

/// `conf` without meshpath's entry; `None` when it had none.
pub fn without_plugin(conf: &Value) -> Option<Value> {
    let plugins = conf.get("plugins")?.as_array()?;
    if !plugins.iter().any(|p| p["type"] == CNI_PLUGIN) {
        return None;
    }
    let mut out = conf.clone();
    out["plugins"] = Value::Array(plugins.iter().filter(|p| p["type"] != CNI_PLUGIN).cloned().collect());
    Some(out)
}

fn as_list(conf: Value) -> Result<Value, String> {
    let obj = conf.as_object().ok_or("not a JSON object")?;
    if obj.contains_key("plugins") {
        return Ok(conf);
    }
    let ty = obj.get("type").and_then(Value::as_str).ok_or("neither \"plugins\" nor \"type\"")?;
    if ty.is_empty() {
        return Err("an empty \"type\"".into());
    }
    let mut single = conf.clone();
    let map = single.as_object_mut().ok_or("not a JSON object")?;
    let version = map.remove("cniVersion").unwrap_or(json!("1.0.0"));
    let name = map.remove("name").unwrap_or(json!("k8s-pod-network"));
    Ok(json!({ "cniVersion": version, "name": name, "plugins": [single] }))
}

/// Whether `conf` already ends with exactly this entry.
fn chained(conf: &Value, entry: &Value) -> bool {
    conf.get("plugins").and_then(Value::as_array).and_then(|p| p.last()) == Some(entry)
}

/// Writes `bytes` to `path` through a temporary file and a rename: a runtime never reads
/// half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let tmp = path.with_extension("meshpath-tmp");
    // Created with its final mode: a token is never readable by others, not even briefly.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    // The umask may have taken bits the mode asked for (0755 for the binary).
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// One install pass: the binary, the kubeconfig and the chain entry, each written only when
/// it differs. Whether the chain entry had to be (re)written.
pub fn install_once(cfg: &InstallConfig) -> Result<bool, InstallError> {
    let bin = std::fs::read(&cfg.plugin).map_err(io(&cfg.plugin))?;
    let target = cfg.bin_dir.join(CNI_PLUGIN);
    if std::fs::read(&target).ok().as_deref() != Some(&bin[..]) {
        write_atomic(&target, &bin, 0o755)?;
    }
    if matches!(cfg.decider, Decider::ServiceAccount) {
        let kubeconfig = service_account_kubeconfig()?;
        let path = cfg.conf_dir.join(KUBECONFIG_NAME);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(kubeconfig.as_str()) {
            write_atomic(&path, kubeconfig.as_bytes(), 0o600)?;
        }
    }
    let path = primary(&cfg.conf_dir)?;
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let conf: Value =
        serde_json::from_str(&text).map_err(|e| InstallError::Config { path: path.clone(), why: e.to_string() })?;
    let entry = entry(cfg);
    if chained(&conf, &entry) {
        return Ok(false);
    }
    let list = with_plugin(conf, &entry).map_err(|why| InstallError::Config { path: path.clone(), why })?;
    let pretty = serde_json::to_string_pretty(&list).unwrap_or_default();
    // A single plugin's `.conf` becomes a `.conflist` of the same name.
    let out =
        if path.extension().is_some_and(|e| e == "conflist") { path.clone() } else { path.with_extension("conflist") };
    write_atomic(&out, pretty.as_bytes(), 0o644)?;
    if out != path {
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    tracing::info!(file = %out.display(), "meshpath-cni chained into the pod network's configuration");
    Ok(true)
}

/// Takes meshpath's entry out of every configuration in the conf dir, and removes the binary
/// and the kubeconfig it wrote. What it removed, for the log.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(conf_dir).map_err(io(conf_dir))?.flatten() {
        let path = entry.path();
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let Some(list) = serde_json::from_str::<Value>(&text).ok().as_ref().and_then(without_plugin) else { continue };
        write_atomic(&path, serde_json::to_string_pretty(&list).unwrap_or_default().as_bytes(), 0o644)?;
        removed.push(path);
    }
    for path in [bin_dir.join(CNI_PLUGIN), conf_dir.join(KUBECONFIG_NAME)] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(InstallError::Io { path, source: e }),
        }
    }
    Ok(removed)
}

/// Installs, then with `watch` keeps the entry in place until `stop`: a primary CNI that
/// rewrites its file (flannel, Calico at start) gets the entry back within
/// [`WATCH_EVERY`]. A failure while watching is logged and retried, never fatal.
pub async fn run(cfg: &InstallConfig, watch: bool, mut stop: drain::Watcher) -> Result<(), InstallError> {
    if !watch {
        return install_once(cfg).map(|_| ());
    }
    // On a new node the pod network may write its configuration after this starts: waited for.
    let (mut chained, mut failing) = (false, false);
    loop {
        match install_once(cfg) {
            Ok(rewritten) => {
                if rewritten && chained {
                    tracing::warn!("the pod network's configuration had lost meshpath-cni; chained it again");
                } else if failing && !rewritten {
                    tracing::info!("meshpath-cni is chained");
                }
                (chained, failing) = (true, false);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("keeping meshpath-cni chained (retrying every {WATCH_EVERY:?}): {e}");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = stop.signalled() => return Ok(()),
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
    }
}

fn service_account_kubeconfig() -> Result<String, InstallError> {
    let read = |what: &'static str, file: &str| {
        std::fs::read_to_string(Path::new(SERVICE_ACCOUNT).join(file))
            .map_err(|source| InstallError::ServiceAccount { what, source })
    };
    let token = read("token", "token")?;
    let ca = read("CA certificate", "ca.crt")?;
    let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| InstallError::ServiceAccount {
        what: "API server address (KUBERNETES_SERVICE_HOST)",
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Ok(kubeconfig_yaml(&host, &port, &ca, &token))
}

/// A kubeconfig for the API server at `host:port`, trusting `ca_pem`, with `token`.
fn kubeconfig_yaml(host: &str, port: &str, ca_pem: &str, token: &str) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{host}:{port}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: meshpath-cni\n  user:\n    token: {}\ncontexts:\n- name: \
         meshpath-cni\n  context:\n    cluster: local\n    user: meshpath-cni\ncurrent-context: meshpath-cni\n",
        token.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> InstallConfig {
        InstallConfig {
            node: "n1".into(),
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            decider: Decider::Workloads("/etc/meshpath/workloads.yaml".into()),
            exclude_namespaces: vec!["kube-system".into()],
            timeout_secs: 10,
            plugin: dir.join("plugin"),
        }
    }

    #[test]
    fn the_written_kubeconfig_is_one_kube_reads() {
        let text = kubeconfig_yaml("fd00::1", "6443", "-----BEGIN CERTIFICATE-----\nAA==\n", "tok\n");
        let kc = kube::config::Kubeconfig::from_yaml(&text).expect("a kubeconfig");
        let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://[fd00::1]:6443"));
        assert!(cluster.certificate_authority_data.is_some());
        assert_eq!(kc.current_context.as_deref(), Some("meshpath-cni"));
    }

    #[test]
    fn the_entry_goes_last_once_and_comes_out_again() {
        let e = json!({"type": CNI_PLUGIN, "node": "n1"});
        let flannel =
            json!({"cniVersion": "0.3.1", "name": "cbr0", "plugins": [{"type": "flannel"}, {"type": "portmap"}]});
        let once = with_plugin(flannel.clone(), &e).expect("valid");
        assert_eq!(once["plugins"].as_array().map(Vec::len), Some(3));
        assert!(chained(&once, &e));
        let twice = with_plugin(once.clone(), &json!({"type": CNI_PLUGIN, "node": "n2"})).expect("valid");
        assert_eq!(twice["plugins"].as_array().map(Vec::len), Some(3), "replaced, not added");
        assert_eq!(without_plugin(&once), Some(flannel.clone()));
        assert_eq!(without_plugin(&flannel), None);
        // A single plugin's conf is made a list, its version and name kept.
        let single = json!({"cniVersion": "1.0.0", "name": "kindnet", "type": "ptp", "ipam": {}});
        let list = with_plugin(single, &e).expect("valid");
        assert_eq!(list["name"], "kindnet");
        assert_eq!(list["plugins"][0], json!({"type": "ptp", "ipam": {}}));
        assert!(with_plugin(json!([1]), &e).is_err());
        assert!(with_plugin(json!({"name": "x"}), &e).is_err());
    }

    #[test]
    fn install_writes_only_what_differs_and_uninstall_takes_it_all_back() {
        let dir = std::env::temp_dir().join(format!("meshpath-cni-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = cfg(&dir);
        std::fs::create_dir_all(&c.bin_dir).expect("dir");
        std::fs::create_dir_all(&c.conf_dir).expect("dir");
        std::fs::write(&c.plugin, b"binary").expect("write");
        assert!(matches!(install_once(&c), Err(InstallError::NoPrimary(_))));
        let flannel = json!({"cniVersion": "0.3.1", "name": "cbr0", "plugins": [{"type": "flannel"}]});
        std::fs::write(c.conf_dir.join("10-flannel.conflist"), flannel.to_string()).expect("write");
        std::fs::write(c.conf_dir.join("99-other.conf"), r#"{"type":"bridge"}"#).expect("write");
        assert!(install_once(&c).expect("install"));
        assert!(!install_once(&c).expect("again"), "nothing left to write");
        let text = std::fs::read_to_string(c.conf_dir.join("10-flannel.conflist")).expect("read");
        let list: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(list["plugins"][1]["workloads"], "/etc/meshpath/workloads.yaml");
        assert_eq!(std::fs::read(c.bin_dir.join(CNI_PLUGIN)).expect("bin"), b"binary");
        // The primary CNI rewrites its file: the next pass chains it again.
        std::fs::write(c.conf_dir.join("10-flannel.conflist"), flannel.to_string()).expect("write");
        assert!(install_once(&c).expect("again"));
        let removed = uninstall(&c.bin_dir, &c.conf_dir).expect("uninstall");
        assert_eq!(removed.len(), 2, "{removed:?}");
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(c.conf_dir.join("10-flannel.conflist")).expect("read"))
                .expect("json");
        assert_eq!(back, flannel);
        assert!(!c.bin_dir.join(CNI_PLUGIN).exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
