//! The node's state directory, `<STATE_DIR>/<node>/` (`/run/meshpath`): the node lock, the
//! daemons' notes, the handover socket, the clsact markers. It is root-only: whoever can open
//! the lock can `flock` it, and an exclusive lock held by any user stops every daemon start,
//! a shared one every uninstall. So every directory meshpath makes there is 0700 and every
//! file 0600, and what an older version left more open is closed when a daemon starts or an
//! uninstall runs ([`close_up`]).
//!
//! A process that opened a file before it was closed up keeps its descriptor (and its lock):
//! the kernel checks permissions at open only.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use meshpath_common::names::STATE_DIR;

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Whether a mode lets anyone but the owner in.
fn too_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Creates `dir` (under [`STATE_DIR`]) and its missing parents root-only, and closes up the
/// ones that exist, up to [`STATE_DIR`] itself.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    private_dir_under(Path::new(STATE_DIR), dir)
}

fn private_dir_under(top: &Path, dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    for d in dir.ancestors().take_while(|d| d.starts_with(top)) {
        close(d, DIR_MODE)?;
    }
    Ok(())
}

/// Opens `path` with `options`, creating it 0600 and closing it up if it exists.
pub fn private_file(path: &Path, options: &OpenOptions) -> io::Result<File> {
    let file = options.clone().mode(FILE_MODE).open(path)?;
    if too_open(file.metadata()?.permissions().mode()) {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(file)
}

/// Closes up `dir` and everything in it: directories 0700, files and sockets 0600. Symbolic
/// links are left alone (their own mode means nothing; what they name is not meshpath's).
pub fn close_up(dir: &Path) -> io::Result<()> {
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        close(&d, DIR_MODE)?;
        // A daemon's notes go with it: a directory can vanish under the walk.
        let entries = match std::fs::read_dir(&d) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            entries => entries?,
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if !kind.is_symlink() {
                close(&entry.path(), FILE_MODE)?;
            }
        }
    }
    Ok(())
}

/// Sets `path`'s mode to `mode` if it lets others in; a path that went meanwhile is fine.
fn close(path: &Path, mode: u32) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_symlink() && too_open(m.permissions().mode()) => {
            std::fs::set_permissions(path, Permissions::from_mode(mode))
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch directory of this test's own, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("meshpath-state-dir-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("it exists").permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn only_the_owner_is_let_in() {
        assert!(!too_open(0o700) && !too_open(0o600) && !too_open(0o400));
        assert!(too_open(0o644) && too_open(0o755) && too_open(0o701) && too_open(0o620));
    }

    #[test]
    fn directories_are_made_root_only_and_open_ones_up_to_the_top_closed() {
        let s = Scratch::new("dirs");
        let top = s.0.join("meshpath");
        std::fs::create_dir(&top).expect("top");
        chmod(&top, 0o755);
        let notes = top.join("node-1").join("daemons");
        private_dir_under(&top, &notes).expect("made");
        for d in [&top, &top.join("node-1"), &notes] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        // Above the top is not meshpath's.
        assert_ne!(mode(&s.0), 0o700, "the scratch directory itself was changed");
    }

    #[test]
    fn files_are_created_0600_and_an_open_one_is_closed_on_opening() {
        let s = Scratch::new("files");
        let mut options = OpenOptions::new();
        options.create(true).truncate(false).write(true);
        let lock = s.0.join("lock");
        drop(private_file(&lock, &options).expect("created"));
        assert_eq!(mode(&lock), 0o600);
        chmod(&lock, 0o644);
        drop(private_file(&lock, &options).expect("opened"));
        assert_eq!(mode(&lock), 0o600, "an older version's lock file stays open to all");
    }

    #[test]
    fn closing_up_reaches_every_directory_and_file_but_no_link() {
        let s = Scratch::new("tree");
        let node = s.0.join("node-1");
        let notes = node.join("daemons");
        std::fs::create_dir_all(&notes).expect("dirs");
        let (lock, note) = (node.join("lock"), notes.join("42.json"));
        std::fs::write(&lock, "").expect("lock");
        std::fs::write(&note, "{}").expect("note");
        let outside = s.0.join("outside");
        std::fs::write(&outside, "").expect("outside");
        chmod(&outside, 0o644);
        std::os::unix::fs::symlink(&outside, node.join("link")).expect("link");
        for (p, m) in [(&node, 0o755), (&notes, 0o755), (&lock, 0o644), (&note, 0o644)] {
            chmod(p, m);
        }
        close_up(&node).expect("closed up");
        for d in [&node, &notes] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        for f in [&lock, &note] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        assert_eq!(mode(&outside), 0o644, "a link was followed out of the tree");
    }
}
