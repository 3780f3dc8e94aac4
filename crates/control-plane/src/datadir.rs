//! The data directory (`--data`): checked before anything binds a port, and kept private.
//!
//! The directory holds the SQLite database, the admin token, the master key and (under
//! `portico up`) the service-account key, state and logs: everything in it is for the owner
//! only. [`prepare`] creates it `0700` (or tightens it to `0700`), tightens the database files
//! an older version left `0644`, and proves the directory can be written by creating and
//! removing a file, so a read-only, unwritable or not-a-directory `--data` is one sentence at
//! start instead of a server that listens, never answers and gives up 30 s later.

use std::path::{Path, PathBuf};

/// The SQLite files (`portico.db` and the files SQLite keeps beside it).
pub const SQLITE_FILES: &[&str] = &[
    "portico.db",
    "portico.db-wal",
    "portico.db-shm",
    "portico.db-journal",
];

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path} is not a directory; pass --data a directory")]
    NotADirectory { path: String },
    #[error("cannot use data directory {path}: {source}")]
    Unusable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {path} is not writable: {source}")]
    NotWritable {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Creates `dir` (mode `0700`) or checks and tightens it, tightens the SQLite files in it to
/// `0600`, and checks that it can be written.
pub fn prepare(dir: &Path) -> Result<(), DataDirError> {
    let shown = || dir.display().to_string();
    let unusable = |source| DataDirError::Unusable {
        path: shown(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(DataDirError::NotADirectory { path: shown() }),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(unusable)?;
            }
            if let Err(e) = create_private_dir(dir) {
                // Another process may have created it meanwhile; anything else is fatal.
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(unusable(e));
                }
            }
        }
        // e.g. "Not a directory" when a parent is a regular file.
        Err(e) => return Err(unusable(e)),
    }
    check_writable(dir).map_err(|source| DataDirError::NotWritable {
        path: shown(),
        source,
    })?;
    tighten(dir, 0o700);
    for name in SQLITE_FILES {
        tighten(&dir.join(name), 0o600);
    }
    Ok(())
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir(dir)
}

/// Creates and removes a file: the only test that also holds for root (for whom permission
/// bits do not stop writes) and for read-only file systems.
fn check_writable(dir: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let probe: PathBuf = dir.join(format!(".portico-write-check-{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let written = opts.open(&probe).and_then(|mut f| f.write_all(b"ok"));
    let removed = std::fs::remove_file(&probe);
    written?;
    removed
}

/// Removes permission bits beyond `mode` from `path` if it exists. Symbolic links are left
/// alone (chmod would change their target). A failure is logged, not fatal: the file still
/// works, it is only more readable than it should be.
pub fn tighten(path: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.file_type().is_symlink() {
            return;
        }
        let current = meta.permissions().mode() & 0o777;
        if current & !mode == 0 {
            return;
        }
        let wanted = current & mode;
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                from = format_args!("{current:o}"),
                to = format_args!("{wanted:o}"),
                "made private"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot make this file private; other users may read it"
            ),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn creates_private_and_tightens_what_an_older_version_left() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a/b/data");
        prepare(&dir).expect("prepare");
        assert_eq!(mode(&dir), 0o700);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for name in ["portico.db", "portico.db-wal", "portico.db-shm"] {
            std::fs::write(dir.join(name), b"").expect("write");
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        // Not Portico's: left as it is.
        std::fs::write(dir.join("notes.txt"), b"").expect("write");
        std::fs::set_permissions(
            dir.join("notes.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        prepare(&dir).expect("prepare again");
        assert_eq!(mode(&dir), 0o700);
        for name in ["portico.db", "portico.db-wal", "portico.db-shm"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert_eq!(mode(&dir.join("notes.txt")), 0o644);
        // Tightening only removes bits.
        std::fs::set_permissions(
            dir.join("portico.db"),
            std::fs::Permissions::from_mode(0o400),
        )
        .expect("chmod");
        tighten(&dir.join("portico.db"), 0o600);
        assert_eq!(mode(&dir.join("portico.db")), 0o400);
        // No probe file is left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".portico-write-check")),
            "{names:?}"
        );
    }

    /// Every file a started control plane keeps in its data directory, SQLite's included,
    /// is owner-only, and a directory an older version left open is tightened at start.
    #[tokio::test]
    async fn a_started_control_plane_keeps_its_files_private() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        let opts = crate::app::ServeOptions::sqlite("127.0.0.1:0".parse().expect("addr"), &dir);
        let bound = "127.0.0.1:1".parse().expect("addr");
        let check = |when: &str| {
            assert_eq!(
                mode(&dir),
                0o700,
                "{when}: the directory is {:o}",
                mode(&dir)
            );
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&dir).expect("list") {
                let entry = entry.expect("entry");
                let name = entry.file_name().to_string_lossy().into_owned();
                assert_eq!(mode(&entry.path()) & 0o077, 0, "{when}: {name}");
                names.push(name);
            }
            for expected in [
                "portico.db",
                "portico.db-wal",
                "portico.db-shm",
                "admin-token",
            ] {
                assert!(names.iter().any(|n| n == expected), "{when}: {names:?}");
            }
        };
        let (state, _) = crate::app::build_state(&opts, bound).await.expect("state");
        check("first start");
        state.store.pool().close().await;
        drop(state);

        // What an older version left: the directory and database files readable by all.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for name in ["portico.db", "portico.db-wal", "portico.db-shm"] {
            let p = dir.join(name);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
            }
        }
        let (state, _) = crate::app::build_state(&opts, bound).await.expect("state");
        check("second start");
        state.store.pool().close().await;
    }

    /// Works as root too: a path under a regular file cannot be a directory for anyone.
    #[test]
    fn unusable_directories_are_one_sentence() {
        let root = tempfile::tempdir().expect("tempdir");
        let file = root.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = prepare(&file).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "data directory {} is not a directory; pass --data a directory",
                file.display()
            )
        );
        let under = file.join("data");
        let err = prepare(&under).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot use data directory {}: Not a directory (os error 20)",
                under.display()
            )
        );
    }

    /// A directory without write permission. Root ignores permission bits, so there the case
    /// is skipped (loudly); the regular-file cases above cover root.
    #[test]
    fn an_unwritable_directory_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ro");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        if check_writable(&dir).is_ok() {
            eprintln!("SKIPPED: an_unwritable_directory_is_refused: running as root");
            return;
        }
        let err = prepare(&dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "data directory {} is not writable: Permission denied (os error 13)",
                dir.display()
            )
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
}
