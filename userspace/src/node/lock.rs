//! The node lock: every daemon serving a node holds it shared for its whole life, and
//! `meshpath uninstall` takes it exclusively, so it can never remove a datapath under a
//! running daemon, whatever network namespace or ports that daemon uses. It is a file in
//! the node's state directory (`/run/meshpath/<node>/lock`, a hostPath in the DaemonSet),
//! so the kernel releases it when its holder dies, even by SIGKILL. Only root may open it
//! ([`crate::state_dir`]): any user holding it would stop daemons or uninstall.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use meshpath_common::names::STATE_DIR;
use nix::fcntl::{Flock, FlockArg};

use crate::{datapath, state_dir};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(transparent)]
    Node(#[from] datapath::DatapathError),
    #[error("an uninstall of node {0} is in progress ({1} is locked); start the daemon after it")]
    Uninstalling(String, String),
}

/// A held node lock; released on drop.
pub struct NodeLock {
    _lock: Flock<File>,
}

fn lock_path(node: &str) -> Result<PathBuf, LockError> {
    datapath::validate_node_name(node)?;
    Ok(PathBuf::from(STATE_DIR).join(node).join("lock"))
}

fn open(node: &str) -> Result<(File, PathBuf), LockError> {
    let path = lock_path(node)?;
    let io = |source| LockError::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        // Every daemon start and uninstall comes here first: what an older version left
        // open to all is closed before anything else is opened.
        state_dir::private_dir(dir).map_err(io)?;
        state_dir::close_up(dir).map_err(io)?;
    }
    let file = state_dir::private_file(&path, std::fs::OpenOptions::new().create(true).truncate(false).write(true))
        .map_err(io)?;
    Ok((file, path))
}

impl NodeLock {
    /// A daemon's share of the lock.
    pub fn shared(node: &str) -> Result<Self, LockError> {
        let (file, path) = open(node)?;
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(l) => Ok(Self { _lock: l }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                Err(LockError::Uninstalling(node.to_owned(), path.display().to_string()))
            }
            Err((_, e)) => Err(LockError::Io { path: path.display().to_string(), source: e.into() }),
        }
    }

    /// The whole lock, for uninstall; `None` while any daemon holds its share.
    pub fn exclusive(node: &str) -> Result<Option<Self>, LockError> {
        let (file, path) = open(node)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(Self { _lock: l })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(LockError::Io { path: path.display().to_string(), source: e.into() }),
        }
    }
}
