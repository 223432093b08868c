//! Owner-only files: the data directory is `0700` and what the embedded store writes in
//! it (`pigeon.db` and its `-wal`/`-shm`, blob files) `0600`, because they hold stored
//! messages and password hashes. A directory or file found with looser modes (made by an
//! older Pigeon, or by hand) is tightened at start, with a warning saying so. No-ops
//! where there are no Unix permissions.

use std::path::Path;

/// Creates `dir` (and missing parents) owner-only, or tightens it if it is looser.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    tighten(dir, 0o700)
}

/// Creates `path` empty and owner-only when it does not exist, or tightens it if it is
/// looser. SQLite gives the `-wal` and `-shm` files the database file's mode.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => tighten(path, 0o600),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` (replacing what was there), owner-only (blocking).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)?.write_all(bytes)
}

/// Tightens `path` (if it exists) to `mode` when group or others have any access.
pub fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let old = meta.permissions().mode() & 0o777;
        if old & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            tracing::warn!(
                path = %path.display(),
                was = format!("{old:o}"),
                now = format!("{mode:o}"),
                "tightened permissions: stored messages and password hashes are owner-only"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}
