//! Checks on the names that become paths in the cache, so that none can reach outside it: the
//! caller's repository, file name and revision, and the commit hash and ETag the server answers
//! with (any server can be named by `HF_ENDPOINT`). Also the server's text made safe to show in
//! an error.

use std::path::{Component, Path};

use crate::{Error, Result};

pub(super) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A name that is one plain path component: letters, digits, `-` and `_`. Hub ETags are
/// hashes (SHA-1 for files in git, SHA-256 for LFS files).
pub(super) fn is_plain_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A server-supplied header value made safe to show: no control characters, bounded length.
pub(super) fn sanitize(s: &str) -> String {
    const MAX_CHARS: usize = 200;
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_CHARS)
        .collect()
}

/// `owner/name` with the characters the hub allows; `--` and `..` are refused as the hub
/// refuses them (`--` separates the parts of cache folder names).
pub(super) fn validate_repo(repo: &str) -> Result<()> {
    const MAX_PART: usize = 96;
    let parts: Vec<&str> = repo.split('/').collect();
    let [owner, name] = parts.as_slice() else {
        return Err(invalid("repo", repo, "is not of the form \"owner/name\""));
    };
    for part in [owner, name] {
        if part.is_empty() || part.len() > MAX_PART {
            return Err(invalid(
                "repo",
                repo,
                &format!("needs an owner and a name of 1 to {MAX_PART} characters"),
            ));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(invalid(
                "repo",
                repo,
                "may only contain letters, digits, '-', '_' and '.'",
            ));
        }
        if part.contains("--") || part.contains("..") {
            return Err(invalid("repo", repo, "may not contain \"--\" or \"..\""));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err(invalid(
                "repo",
                repo,
                "may not start or end a part with '-' or '.'",
            ));
        }
    }
    Ok(())
}

/// A relative path inside the repository: it is joined to cache folders, so it must not escape
/// them; `\\`, `?` and `#` are refused, as no hub file name has them.
pub(super) fn validate_filename(filename: &str) -> Result<()> {
    if filename.is_empty() {
        return Err(invalid("filename", filename, "is empty"));
    }
    if filename
        .chars()
        .any(|c| c.is_control() || matches!(c, '\\' | '?' | '#'))
    {
        return Err(invalid(
            "filename",
            filename,
            "may not contain control characters, '\\', '?' or '#'",
        ));
    }
    let path = Path::new(filename);
    if path.is_absolute() || filename.starts_with('/') {
        return Err(invalid(
            "filename",
            filename,
            "must be a path relative to the repository",
        ));
    }
    if filename
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
        || !path.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(invalid(
            "filename",
            filename,
            "may not contain empty, '.' or '..' components",
        ));
    }
    Ok(())
}

/// A branch, tag or commit; it becomes `refs/<revision>` in the cache, hence the same rules
/// about components as for file names.
pub(super) fn validate_revision(revision: &str) -> Result<()> {
    if revision.is_empty() {
        return Err(invalid("revision", revision, "is empty"));
    }
    if revision
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '\\' | '?' | '#'))
    {
        return Err(invalid(
            "revision",
            revision,
            "may not contain whitespace, control characters, '\\', '?' or '#'",
        ));
    }
    if revision
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
        || !Path::new(revision)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(invalid(
            "revision",
            revision,
            "may not contain empty, '.' or '..' components",
        ));
    }
    Ok(())
}

fn invalid(what: &str, value: &str, why: &str) -> Error {
    Error::invalid_argument(format!("{what}: {value:?} {why}"))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use tempfile::TempDir;

    use crate::hub::fake_hub::{config, hostile, hub_message, Misbehaviour, COMMIT, ETAG};
    use crate::hub::fetch_with;
    use crate::Error;

    /// Files and folders under `root` but not under its cache, `root/hub`.
    fn outside_the_cache(root: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if !path.starts_with(root.join("hub")) {
                    found.push(path.clone());
                }
                if path.is_dir() && !path.is_symlink() {
                    pending.push(path);
                }
            }
        }
        found
    }

    #[test]
    fn hostile_names_for_cache_paths_are_refused() {
        for (commit, etag, header) in [
            (COMMIT, "../../../escape", "ETag"),
            (COMMIT, "..", "ETag"),
            (COMMIT, "a/b", "ETag"),
            (COMMIT, "/tmp/x", "ETag"),
            ("../../../escape", ETAG, "X-Repo-Commit"),
            (
                "0123456789abcdef0123456789abcdef012345/.",
                ETAG,
                "X-Repo-Commit",
            ),
            ("main", ETAG, "X-Repo-Commit"),
        ] {
            let hub = hostile(commit, etag, Misbehaviour::None);
            let cache = TempDir::new().unwrap();
            let cfg = config(hub.endpoint(), &cache);
            let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
            assert!(msg.contains(header) && msg.contains("HF_ENDPOINT"), "{msg}");
            // Refused before anything was written.
            assert!(!cfg.cache_dir.exists(), "{commit} {etag}");
            assert_eq!(outside_the_cache(cache.path()), Vec::<PathBuf>::new());
        }
    }

    #[test]
    fn bad_arguments_are_rejected_by_name() {
        let cache = TempDir::new().unwrap();
        // Offline and empty: a valid request would fail with Error::Hub, never reach a network.
        let mut cfg = config("http://127.0.0.1:9".into(), &cache);
        cfg.offline = true;
        let check = |repo: &str, file: &str, rev: &str, arg: &str| match fetch_with(
            &cfg, repo, file, rev, false,
        ) {
            Err(Error::InvalidArgument(msg)) => {
                assert!(msg.starts_with(&format!("{arg}: ")), "{msg}")
            }
            other => panic!("{repo:?} {file:?} {rev:?}: expected {arg} error, got {other:?}"),
        };
        for repo in [
            "",
            "model",
            "/owner/model",
            "owner/model/",
            "a/b/c",
            "owner/../x",
            "../model",
            "owner/mo del",
            "owner/mo\ndel",
            "owner/model\t",
            "owner/mo--del",
            "owner/.model",
            "owner/",
            "C:/model",
        ] {
            check(repo, "f.gguf", "main", "repo");
        }
        for file in [
            "",
            "/etc/passwd",
            "../f.gguf",
            "a/../../f.gguf",
            "a//f.gguf",
            "./f.gguf",
            "a\\..\\f.gguf",
            "f.gguf?x=1",
            "f\u{0}.gguf",
        ] {
            check("owner/model", file, "main", "filename");
        }
        for rev in ["", "..", "../main", "/main", "ma in", "main\n", "a//b"] {
            check("owner/model", "f.gguf", rev, "revision");
        }
        for (repo, file, rev) in [
            ("microsoft/Phi-3-mini-4k-instruct-gguf", "q4/f.gguf", "main"),
            ("a_b.c/d-e", "f.gguf", "refs/pr/1"),
            ("o/m", "f.gguf", COMMIT),
        ] {
            let msg = hub_message(fetch_with(&cfg, repo, file, rev, false));
            assert!(msg.contains("offline"), "{msg}");
        }
    }
}
