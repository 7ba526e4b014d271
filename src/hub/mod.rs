//! Fetching model files from the Hugging Face hub.
//!
//! Files land in the cache that Python's `huggingface_hub` uses
//! (`<cache>/models--owner--name/{blobs,snapshots/<commit>,refs/<revision>}`), so a model
//! downloaded by either is found by the other.
//!
//! **The hub is not trusted.** `HF_ENDPOINT` may name any server, so what it answers is checked
//! before it is used: the commit hash and the ETag become path components in the cache, so they
//! must be a hash and a plain name (no `/`, no `..`); redirects are counted; every connection
//! has timeouts (connecting, each read, and the metadata request as a whole), and a body that
//! trickles slower than 1 KiB per timeout counts as stalled; a file is never written past the
//! size the server announced, must fit in the free space, and must arrive whole before it goes
//! into the cache (an interrupted download resumes from its `.part` file). The requests are
//! made here, with `ureq`, rather than by `hf-hub`, which writes the server's ETag and commit
//! into paths unchecked and has no timeouts.
//!
//! **Cache first.** A file already in the cache for `revision` is returned without any network
//! access, online or not. `huggingface_hub` instead asks the
//! hub, when online, whether a branch such as `main` has moved on. phi3 favours starting without
//! a round trip (and without failing on a flaky network) over picking up a re-uploaded file: to
//! get a newer `main`, pass a commit hash as `revision` or delete the repository's cache folder.
//!
//! The parts, by job: `config` reads the environment, `cache` knows the cache's layout on disk,
//! `download` talks to the hub and writes what it sends, and `validate` checks the names that
//! become paths, the caller's and the server's; `fake_hub` stands in for the hub in tests.

mod cache;
mod config;
mod download;
#[cfg(test)]
mod fake_hub;
mod validate;

use std::path::PathBuf;

use crate::{Error, Result};
use cache::{cached, create_parent, link, repo_dir};
use download::RepoFile;
use validate::{validate_filename, validate_repo, validate_revision};

pub use config::HubConfig;

pub const DEFAULT_REPO: &str = "microsoft/Phi-3-mini-4k-instruct-gguf";
pub const DEFAULT_FILE: &str = "Phi-3-mini-4k-instruct-q4.gguf";
pub const DEFAULT_REVISION: &str = "main";

/// Returns the local path of `filename` in `repo` at `revision`, downloading it into the cache
/// if needed, with a progress bar on stderr when `progress` is true. Configured by the
/// environment, see [`HubConfig::from_env`].
pub fn fetch(repo: &str, filename: &str, revision: &str, progress: bool) -> Result<PathBuf> {
    fetch_with(&HubConfig::from_env()?, repo, filename, revision, progress)
}

/// [`fetch`] with an explicit configuration.
pub fn fetch_with(
    config: &HubConfig,
    repo: &str,
    filename: &str,
    revision: &str,
    progress: bool,
) -> Result<PathBuf> {
    validate_repo(repo)?;
    validate_filename(filename)?;
    validate_revision(revision)?;

    if let Some(path) = cached(config, repo, filename, revision) {
        return Ok(path);
    }
    if config.offline {
        return Err(Error::Hub(format!(
            "{filename} from {repo} at revision {revision} is not in the cache {} and offline \
             mode is on (HF_HUB_OFFLINE): download it once with network access",
            config.cache_dir.display()
        )));
    }

    let file = RepoFile {
        config,
        repo,
        filename,
        revision,
    };
    let metadata = file.metadata()?;
    let repo_dir = repo_dir(config, repo);
    let blob = repo_dir.join("blobs").join(&metadata.etag);
    // Another snapshot may hold the same file already.
    if !blob.is_file() {
        file.download(&metadata.url, &blob, progress)?;
    }
    let pointer = repo_dir
        .join("snapshots")
        .join(&metadata.commit)
        .join(filename);
    link(&blob, &pointer, filename).map_err(|e| file.io_error(&e))?;
    // As `huggingface_hub` does: a branch or tag is recorded, a commit needs no ref.
    if revision != metadata.commit {
        let reference = repo_dir.join("refs").join(revision);
        create_parent(&reference)
            .and_then(|()| std::fs::write(&reference, &metadata.commit))
            .map_err(|e| file.io_error(&e))?;
    }
    Ok(pointer)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tempfile::TempDir;

    use super::fake_hub::{config, hub_message, test_bytes, FakeHub, Route, COMMIT, ETAG};
    use super::*;

    #[test]
    fn downloads_into_the_python_layout_then_works_offline() {
        let body = test_bytes(300_000);
        let mut hub = FakeHub::start(HashMap::from([(
            "/owner/model/resolve/main/weights.gguf".to_string(),
            Route::File {
                body: body.clone(),
                etag: ETAG,
            },
        )]));
        let cache = TempDir::new().unwrap();
        let mut cfg = config(hub.endpoint(), &cache);
        cfg.token = Some("hf_secret".into());

        let path = fetch_with(&cfg, "owner/model", "weights.gguf", "main", false).unwrap();
        let repo_dir = cfg.cache_dir.join("models--owner--model");
        assert_eq!(
            path,
            repo_dir.join("snapshots").join(COMMIT).join("weights.gguf")
        );
        assert_eq!(std::fs::read(&path).unwrap(), body);
        assert_eq!(
            std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
            COMMIT
        );
        assert_eq!(
            std::fs::read(repo_dir.join("blobs").join(ETAG)).unwrap(),
            body
        );
        let requests = hub.requests();
        assert!(!requests.is_empty());
        for request in &requests {
            assert!(
                request.contains("\nauthorization: Bearer hf_secret"),
                "no token in {request}"
            );
        }

        // No hub any more: the cache answers, online or offline, by branch or by commit.
        hub.stop();
        let served = requests.len();
        assert_eq!(
            fetch_with(&cfg, "owner/model", "weights.gguf", "main", false).unwrap(),
            path
        );
        cfg.offline = true;
        assert_eq!(
            fetch_with(&cfg, "owner/model", "weights.gguf", "main", false).unwrap(),
            path
        );
        assert_eq!(
            fetch_with(&cfg, "owner/model", "weights.gguf", COMMIT, false).unwrap(),
            path
        );
        assert_eq!(hub.requests().len(), served);

        let msg = hub_message(fetch_with(&cfg, "owner/model", "other.gguf", "main", false));
        for needle in [
            "other.gguf",
            "owner/model",
            "main",
            "offline",
            "HF_HUB_OFFLINE",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        let msg = hub_message(fetch_with(&cfg, "owner/model", "weights.gguf", "v2", false));
        assert!(msg.contains("v2") && msg.contains("offline"), "{msg}");
    }
}
