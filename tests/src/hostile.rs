//! What an unprivileged user on the node can reach: `meshpath-lab reach` runs as that user
//! (the hostile tests start it with another uid) and says, per path, whether it got in.

use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

/// How a try went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Opened (a file, whether or not its lock was free) or connected to (a socket).
    Reached,
    /// Refused for want of permission.
    Denied,
    /// Failed otherwise (the path is not there, not a socket...): proves nothing.
    Error(String),
}

impl Reach {
    fn of(r: io::Result<()>) -> Self {
        match r {
            Ok(()) => Self::Reached,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Self::Denied,
            Err(e) => Self::Error(e.to_string()),
        }
    }

    fn line(&self) -> String {
        match self {
            Self::Reached => "reached".into(),
            Self::Denied => "denied".into(),
            Self::Error(e) => format!("error: {e}"),
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "reached" => Self::Reached,
            "denied" => Self::Denied,
            other => Self::Error(other.trim_start_matches("error: ").to_owned()),
        }
    }
}

fn reach_file(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Held by someone else: still opened, so lockable once they let go.
        Ok(_) | Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(()),
        Err((_, e)) => Err(e.into()),
    }
}

fn reach_socket(path: &Path) -> io::Result<()> {
    let sock = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(())
}

/// `meshpath-lab reach`: one `<outcome>\t<path>` line per path.
pub fn print_reach(files: &[PathBuf], sockets: &[PathBuf]) {
    let tries = files.iter().map(|f| (f, Reach::of(reach_file(f))));
    for (path, r) in tries.chain(sockets.iter().map(|s| (s, Reach::of(reach_socket(s))))) {
        println!("{}\t{}", r.line(), path.display());
    }
}

/// Runs `lab_binary reach` as `uid`:`gid` (no supplementary groups) on `files` and `sockets`.
pub fn reach_as(
    lab_binary: &Path,
    (uid, gid): (u32, u32),
    files: &[PathBuf],
    sockets: &[PathBuf],
) -> io::Result<Vec<(PathBuf, Reach)>> {
    let mut cmd = Command::new(lab_binary);
    cmd.arg("reach");
    for f in files {
        cmd.arg("--file").arg(f);
    }
    for s in sockets {
        cmd.arg("--socket").arg(s);
    }
    // std drops the supplementary groups when it changes the uid.
    let out = cmd.uid(uid).gid(gid).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("reach: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(r, p)| (PathBuf::from(p), Reach::parse(r)))
        .collect())
}
