//! Writing a whole file so that a power cut leaves either the old content or the new, never a mix: a
//! temporary file beside it, fsync, rename over it, fsync of the directory. Here because both sides keep
//! what they exchange on disk (the agent its keys, state and sets; the fleet its store, CA and signers), and
//! this is the crate both build on.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` with file mode `mode` (applied at creation, so the content is never readable by
/// others even for a moment). The temporary file is `path` with the extension `tmp`.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable only once the directory is; a filesystem that cannot fsync one is not an error.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_whole_with_the_mode_and_leave_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("k.priv");
        super::write(&p, b"one", 0o600).unwrap();
        super::write(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!tmp.path().join("k.tmp").exists());
    }
}
