//! Network namespaces by name (under /run/netns, where `ip netns` keeps them) or by path.

use std::io;
use std::path::PathBuf;

/// `/run/netns/<name>` for a name; a path (anything with a `/`) as it is.
pub fn path_of(ns: &str) -> PathBuf {
    if ns.contains('/') { PathBuf::from(ns) } else { PathBuf::from("/run/netns").join(ns) }
}

/// Moves the calling thread into network namespace `ns`. The error names the namespace.
pub fn enter(ns: &str) -> io::Result<()> {
    let path = path_of(ns);
    let named = |e: io::Error| io::Error::new(e.kind(), format!("network namespace {}: {e}", path.display()));
    let file = std::fs::File::open(&path).map_err(named)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| named(e.into()))
}
