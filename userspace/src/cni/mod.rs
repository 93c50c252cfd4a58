//! The chained CNI plugin (`meshpath-cni`), which holds each new pod of the mesh until the
//! node's daemon has it, and its installer (`meshpath cni install`).
//!
//! - [`spec`]: the CNI protocol (environment, configuration, results, errors);
//! - [`plugin`]: what the plugin decides and asks the daemon;
//! - [`wire`]: the messages on the daemon's socket (`<STATE_DIR>/<node>/cni.sock`);
//! - [`install`]: the plugin put into (and taken out of) the pod network's conflist.
//!
//! The daemon's side of the socket is `node::cni`.

pub mod install;
pub mod plugin;
pub mod spec;
pub mod wire;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use meshpath_common::names::{CNI_LOG_FILE, CNI_PODS_FILE, STATE_DIR};
use serde::{Deserialize, Serialize};

use crate::state_dir;

/// The pods the plugin handed over to a node's daemons, by `namespace/name`, as the
/// daemons keep them ([`pods_path`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniPods {
    pub pods: BTreeMap<String, wire::Sandbox>,
}

#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Json(serde_json::Error),
}

/// Where a node's daemons keep the pods the plugin handed over.
pub fn pods_path(node: &str) -> PathBuf {
    Path::new(STATE_DIR).join(node).join(CNI_PODS_FILE)
}

/// The pods in `path` (none when there is no file).
pub fn read_pods(path: &Path) -> Result<CniPods, PodsError> {
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CniPods::default()),
        r => r.map_err(PodsError::Io)?,
    };
    serde_json::from_str(&text).map_err(PodsError::Json)
}

/// The log is cut over to `cni.log.1` beyond this size: the plugin runs once per pod
/// sandbox, forever.
const LOG_LIMIT: u64 = 1024 * 1024;

/// The plugin's log for `node`, which `meshpath status` shows.
pub fn log_path(node: &str) -> PathBuf {
    Path::new(STATE_DIR).join(node).join(CNI_LOG_FILE)
}

/// Opens the plugin's log for appending, root-only, moving a full one aside first.
pub fn open_log(node: &str) -> std::io::Result<File> {
    let path = log_path(node);
    if let Some(dir) = path.parent() {
        state_dir::private_dir(dir)?;
    }
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_LIMIT) {
        let mut old = path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&path, old)?;
    }
    state_dir::private_file(&path, OpenOptions::new().create(true).append(true))
}

/// The last `n` lines of the plugin's log (none when it has not run on this node).
pub fn log_tail(node: &str, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log_path(node)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| (*l).to_owned()).collect()
}
