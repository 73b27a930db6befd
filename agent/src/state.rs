//! Durable state on disk: one way to write a file that must survive a crash or a power
//! loss, one way to set aside a file that cannot be read, one check of a state
//! directory.
//!
//! - [`atomic_write`]: the bytes go to a new temporary file beside the target (created
//!   with `O_EXCL | O_NOFOLLOW`, so a planted file or symlink is never written through),
//!   are fsynced, renamed over the target (a rename replaces a symlink, never follows
//!   it), and the directory is fsynced, so after a crash the file is the old one or the
//!   new one, whole.
//! - [`read`]: a file's bytes, refusing to follow a symlink; missing is `None`.
//! - [`set_aside`]: a file that cannot be parsed is renamed `<name>.bad-<ms>` (kept for
//!   the operator, out of the way), never a reason to stop.
//! - [`check_dir`]: a directory the agent trusts (its state, its plugin cache) and every
//!   ancestor must belong to root or to the agent's user and be writable by nobody else
//!   (a sticky directory such as `/tmp` is allowed), as ssh's StrictModes checks a home
//!   directory: otherwise a user who can write any of them could swap what the agent
//!   reads as root.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` so that a crash at any moment leaves the old file or the new
/// one, whole; never through a symlink.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent(path);
    let name = path.file_name().ok_or_else(|| std::io::Error::other("no file name"))?;
    // Unique per process, call and moment: a temporary file left by a crash (with a
    // pid reused after a reboot) is never in the way.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.{}-{}-{nanos}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        counter()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A file's bytes, or `None` if it does not exist. A symlink is refused.
pub fn read(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
    match f {
        Ok(mut f) => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut buf)?;
            Ok(Some(buf))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(std::io::Error::other(format!(
            "{} is a symlink; state files must be plain files",
            path.display()
        ))),
        Err(e) => Err(e),
    }
}

/// Rename a file that cannot be used to `<name>.bad-<unix ms>` beside it; returns the new
/// path.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = parent(path).join(format!("{name}.bad-{ms}"));
    std::fs::rename(path, &aside)?;
    sync_dir(parent(path))?;
    Ok(aside)
}

/// Create `dir` (mode 0700) if needed, then check it and its ancestors (see the module
/// docs). The error names the directory at fault and what to do.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let full =
        std::fs::canonicalize(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let me = euid();
    // The path as written (a symlink on the way is only as safe as the directory that
    // holds it) and the path it resolves to.
    let written = std::env::current_dir().map_or(dir.to_path_buf(), |cwd| cwd.join(dir));
    for d in written.ancestors().chain(full.ancestors()) {
        let m = std::fs::symlink_metadata(d)
            .map_err(|e| format!("cannot check {}: {e}", d.display()))?;
        if m.file_type().is_symlink() {
            if m.uid() != 0 && m.uid() != me {
                return Err(format!(
                    "{} is a symlink of uid {}, neither root nor the agent's user (uid {me}); replace it with the directory itself",
                    d.display(),
                    m.uid()
                ));
            }
            continue;
        }
        if m.uid() != 0 && m.uid() != me {
            return Err(format!(
                "{} belongs to uid {}, neither root nor the agent's user (uid {me}): another user could replace what gpulet keeps there; chown it",
                d.display(),
                m.uid()
            ));
        }
        let sticky = m.mode() & 0o1000 != 0;
        if m.mode() & 0o022 != 0 && !sticky {
            return Err(format!(
                "{} is writable by group or others (mode {:o}): another user could replace what gpulet keeps there; chmod go-w it",
                d.display(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// This process's effective uid.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The directory `path` is in (`.` for a bare name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn counter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_a_planted_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("state.json");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        assert!(read(&target).unwrap_err().to_string().contains("is a symlink"));
        atomic_write(&target, b"{}").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(read(&target).unwrap().unwrap(), b"{}");
        assert!(!std::fs::symlink_metadata(&target).unwrap().file_type().is_symlink());
    }

    #[test]
    fn a_bad_file_is_set_aside_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.json");
        assert_eq!(read(&f).unwrap(), None);
        std::fs::write(&f, b"").unwrap();
        let aside = set_aside(&f).unwrap();
        assert!(!f.exists() && aside.exists());
        assert!(aside.file_name().unwrap().to_str().unwrap().starts_with("x.json.bad-"));
    }

    #[test]
    fn a_directory_writable_by_others_anywhere_above_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        let state = open.join("inner/state");
        std::fs::create_dir_all(&state).unwrap();
        check_dir(&state).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let e = check_dir(&state).unwrap_err();
        assert!(e.contains("open is writable by group or others (mode 777)"), "{e}");
        // Sticky, as /tmp: allowed.
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .unwrap();
        check_dir(&state).unwrap();
    }
}
