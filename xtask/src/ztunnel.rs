//! The interop test's peer: Istio's ztunnel binary, kept beside the checkout (by default
//! `../shared/peers/ztunnel/`) with the `SHA256SUMS` that says which build it is. A binary
//! that is missing or not that build is an error, never a skipped test.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// The binary's name in the directory and in `SHA256SUMS`.
const BINARY: &str = "ztunnel";
const SUMS: &str = "SHA256SUMS";

/// Where it is when nothing says otherwise: `shared/peers/ztunnel` in the checkout's parent.
pub fn default_dir(checkout: &Path) -> PathBuf {
    checkout.parent().unwrap_or(checkout).join("shared/peers/ztunnel")
}

/// `dir/ztunnel`, once it is known to be the binary `dir/SHA256SUMS` names. Every error is
/// one line naming the path.
pub fn checked(dir: &Path) -> Result<PathBuf> {
    const HINT: &str = "the interop test's peer; --ztunnel-dir or MESHPATH_ZTUNNEL_DIR says where it is";
    let bin = dir.join(BINARY);
    ensure!(bin.is_file(), "no ztunnel binary at {} ({HINT})", bin.display());
    let sums = dir.join(SUMS);
    let text = std::fs::read_to_string(&sums).with_context(|| format!("reading {} ({HINT})", sums.display()))?;
    let want = expected_sha256(&text, BINARY).with_context(|| format!("{} names no {BINARY}", sums.display()))?;
    let out = Command::new("sha256sum").arg(&bin).output().context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {}: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim());
    let got = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    ensure!(
        got == want,
        "{} is not the ztunnel {} names (sha256 {got}, expected {want})",
        bin.display(),
        sums.display()
    );
    Ok(bin)
}

/// The checksum `sha256sum`'s output `text` gives `name` (text or binary mode).
fn expected_sha256(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (hash, file) = l.split_once(' ')?;
        let file = file.strip_prefix([' ', '*'])?;
        (file == name && hash.len() == 64).then(|| hash.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binarys_line_of_sha256sums_is_found_in_either_mode() {
        let h = "d4e5ffa71c7ea5c343b7ed07a39c46f13ea763c09e9bb75c1cf94eaa83eeda48";
        let text = format!("{}  LICENSE\n{h}  ztunnel\n", "0".repeat(64));
        assert_eq!(expected_sha256(&text, "ztunnel").as_deref(), Some(h));
        assert_eq!(expected_sha256(&format!("{}  ztunnel\n", h.to_uppercase()), "ztunnel").as_deref(), Some(h));
        assert_eq!(expected_sha256(&format!("{h} *ztunnel\n"), "ztunnel").as_deref(), Some(h));
        // Another file's line, a truncated sum, a name that only starts alike: none.
        assert_eq!(expected_sha256(&format!("{h}  ztunnel.old\n{h}  LICENSE\n"), "ztunnel"), None);
        assert_eq!(expected_sha256("d4e5  ztunnel\n", "ztunnel"), None);
        assert_eq!(expected_sha256("", "ztunnel"), None);
    }

    #[test]
    fn a_missing_binary_is_one_line_naming_where_it_was_looked_for() {
        let dir = Path::new("/nonexistent/peers/ztunnel");
        let e = format!("{:#}", checked(dir).expect_err("nothing is there"));
        assert!(e.contains("/nonexistent/peers/ztunnel/ztunnel") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn the_default_is_beside_the_checkout() {
        assert_eq!(default_dir(Path::new("/work/main")), Path::new("/work/shared/peers/ztunnel"));
    }
}
