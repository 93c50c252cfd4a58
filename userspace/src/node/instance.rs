//! Each daemon's note of itself, `<STATE_DIR>/<node>/daemons/<pid>.json`, locked for the
//! daemon's whole life (the kernel releases the lock of a killed one): which SOCKMAP sockets
//! are its, and whether it serves or steps down. `meshpath status` reads the notes to name
//! each slot's owner; a note whose lock is free is a dead daemon's and is removed.

use std::fs::File;
use std::io::{Seek, Write};
use std::path::PathBuf;

use meshpath_common::names::STATE_DIR;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::state_dir;

/// Where a daemon is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    /// Loading, reconciling; its sockets are not in the SOCKMAP yet.
    Starting,
    Serving,
    /// Taken over or stopped: handing relays over and draining.
    Draining,
    /// Taken over and drained: waiting for its stop signal, ready to serve again should the
    /// successor die.
    Standby,
}

impl From<super::lifecycle::Phase> for DaemonState {
    fn from(p: super::lifecycle::Phase) -> Self {
        use super::lifecycle::Phase;
        match p {
            Phase::Starting => DaemonState::Starting,
            Phase::Serving => DaemonState::Serving,
            Phase::SteppingDown | Phase::Draining | Phase::Stopped => DaemonState::Draining,
            Phase::Standby => DaemonState::Standby,
        }
    }
}

impl DaemonState {
    pub const fn code(self) -> &'static str {
        match self {
            DaemonState::Starting => "starting",
            DaemonState::Serving => "serving",
            DaemonState::Draining => "draining",
            DaemonState::Standby => "standby",
        }
    }
}

/// What a daemon says of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonNote {
    pub pid: u32,
    pub state: DaemonState,
    /// Cookies of its listening sockets in the SOCKMAP.
    pub sockets: Vec<u64>,
}

fn dir(node: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(node).join("daemons")
}

/// The control socket of daemon `pid` of `node`, beside its note (see `proxy::control`).
pub fn control_socket(node: &str, pid: u32) -> PathBuf {
    dir(node).join(format!("{pid}.sock"))
}

/// This daemon's note, kept up to date and removed when it ends.
pub struct Instance {
    file: Flock<File>,
    path: PathBuf,
    note: DaemonNote,
}

impl Instance {
    /// Writes the note of a starting daemon; `None` (with a warning) when it cannot, as
    /// the note is for operators only.
    pub fn create(node: &str) -> Option<Self> {
        let dir = dir(node);
        let path = dir.join(format!("{}.json", std::process::id()));
        // Locked before it gets its name: a reader never finds it unlocked while we live.
        let open = || -> std::io::Result<Flock<File>> {
            state_dir::private_dir(&dir)?;
            let tmp = path.with_extension("tmp");
            let f = state_dir::private_file(&tmp, std::fs::OpenOptions::new().create(true).truncate(true).write(true))?;
            let f = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| std::io::Error::from(e))?;
            std::fs::rename(&tmp, &path)?;
            Ok(f)
        };
        match open() {
            Ok(file) => {
                let note = DaemonNote { pid: std::process::id(), state: DaemonState::Starting, sockets: Vec::new() };
                let mut me = Self { file, path, note };
                me.write();
                Some(me)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "`meshpath status` will not name this daemon: {e}");
                None
            }
        }
    }

    pub fn set(&mut self, state: DaemonState, sockets: Option<Vec<u64>>) {
        self.note.state = state;
        if let Some(s) = sockets {
            self.note.sockets = s;
        }
        self.write();
    }

    fn write(&mut self) {
        let body = serde_json::to_vec(&self.note).unwrap_or_default();
        let f: &mut File = &mut self.file;
        let written = f.set_len(0).and_then(|()| f.rewind()).and_then(|()| f.write_all(&body));
        if let Err(e) = written {
            tracing::debug!(path = %self.path.display(), "updating this daemon's note: {e}");
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("sock"));
        // The directory goes with the last daemon's note.
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Removes the notes dead daemons left (for uninstall, which holds the node lock whole, so
/// none of them is alive).
pub fn remove_dead(node: &str) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir(node)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The notes of the daemons of `node` alive now; dead ones' notes are removed.
pub fn live(node: &str) -> Vec<DaemonNote> {
    let Ok(entries) = std::fs::read_dir(dir(node)) else { return Vec::new() };
    let mut out = Vec::new();
    for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let Ok(file) = File::open(&path) else { continue };
        // A lock we can take is one no daemon holds.
        if Flock::lock(file, FlockArg::LockSharedNonblock).is_ok() {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("sock"));
            continue;
        }
        if let Some(note) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            out.push(note);
        }
    }
    out.sort_by_key(|n: &DaemonNote| n.pid);
    out
}
