//! The cache on disk, laid out as `huggingface_hub` lays it out so that either finds what the
//! other downloaded: `<cache>/models--owner--name/` holds `blobs/<etag>` (the files, each once),
//! `snapshots/<commit>/<filename>` (links to the blobs) and `refs/<revision>` (the commit a
//! branch or tag was at). Also the file-system work of filling it: the link, the lock a download
//! holds, and the free space it must fit in.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::HubConfig;
use super::validate::is_commit_hash;

/// `<cache>/models--owner--name`.
pub(super) fn repo_dir(config: &HubConfig, repo: &str) -> PathBuf {
    config
        .cache_dir
        .join(format!("models--{}", repo.replace('/', "--")))
}

/// The cached copy of `filename`, if any; found by commit hash too, for which
/// `huggingface_hub` writes no `refs/<hash>`.
pub(super) fn cached(
    config: &HubConfig,
    repo: &str,
    filename: &str,
    revision: &str,
) -> Option<PathBuf> {
    let repo_dir = repo_dir(config, repo);
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
        commit.trim().to_string()
    };
    // The refs file becomes a path component: anything but a hash is a corrupt cache.
    if !is_commit_hash(&commit) {
        return None;
    }
    // `is_file` follows the snapshot's symlink: a dangling one (blob deleted) counts as absent.
    let path = repo_dir.join("snapshots").join(commit).join(filename);
    path.is_file().then_some(path)
}

/// Points the snapshot's `filename` at the blob, as `huggingface_hub` does: a relative symlink
/// (a copy where symlinks cannot be made). An existing one is kept.
pub(super) fn link(blob: &Path, pointer: &Path, filename: &str) -> std::io::Result<()> {
    if pointer.symlink_metadata().is_ok() {
        return Ok(());
    }
    create_parent(pointer)?;
    #[cfg(unix)]
    {
        // From snapshots/<commit>/<filename's folders>/ up to the repository folder.
        let up = 2 + filename.matches('/').count();
        let target = Path::new(&"../".repeat(up))
            .join("blobs")
            .join(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(target, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = filename;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

pub(super) fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::create_dir_all(parent),
        None => Ok(()),
    }
}

/// Takes `path`'s lock, waiting a few seconds for another holder.
pub(super) fn lock(path: &Path) -> std::io::Result<File> {
    let file = File::create(path)?;
    for _ in 0..5 {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => std::thread::sleep(Duration::from_secs(1)),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    file.try_lock().map_err(std::io::Error::from)?;
    Ok(file)
}

/// Bytes free for an unprivileged user on the file system holding `path`'s folder.
#[cfg(unix)]
pub(super) fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::ffi::CString::new(path.parent()?.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `dir` is a NUL-terminated path and `stats` is written by the call before it is
    // read, only when it succeeds.
    let stats = unsafe {
        if libc::statvfs(dir.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    Some((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

#[cfg(not(unix))]
pub(super) fn free_space(_path: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tempfile::TempDir;

    use crate::hub::fake_hub::{config, test_bytes, FakeHub, Route, ETAG};
    use crate::hub::fetch_with;

    #[test]
    fn files_in_subfolders_and_slashed_revisions() {
        let body = test_bytes(1000);
        let hub = FakeHub::start(HashMap::from([(
            "/owner/model/resolve/refs%2Fpr%2F1/q4/model.gguf".to_string(),
            Route::File {
                body: body.clone(),
                etag: ETAG,
            },
        )]));
        let cache = TempDir::new().unwrap();
        let mut cfg = config(hub.endpoint(), &cache);
        let path = fetch_with(&cfg, "owner/model", "q4/model.gguf", "refs/pr/1", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        cfg.offline = true;
        assert_eq!(
            fetch_with(&cfg, "owner/model", "q4/model.gguf", "refs/pr/1", false).unwrap(),
            path
        );
    }
}
