//! Fetching model files from the Hugging Face hub.
//!
//! Files land in the cache that Python's `huggingface_hub` uses
//! (`<cache>/models--owner--name/{blobs,snapshots/<commit>,refs/<revision>}`), so a model
//! downloaded by either is found by the other. The download itself is `hf-hub`'s.
//!
//! **Cache first.** A file already in the cache for `revision` is returned without any network
//! access, online or not (as `hf-hub`'s `ApiRepo::get` does). `huggingface_hub` instead asks the
//! hub, when online, whether a branch such as `main` has moved on. phi3 favours starting without
//! a round trip (and without failing on a flaky network) over picking up a re-uploaded file: to
//! get a newer `main`, pass a commit hash as `revision` or delete the repository's cache folder.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

pub const DEFAULT_REPO: &str = "microsoft/Phi-3-mini-4k-instruct-gguf";
pub const DEFAULT_FILE: &str = "Phi-3-mini-4k-instruct-q4.gguf";
pub const DEFAULT_REVISION: &str = "main";

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the hub is, where the cache is, and how to talk to the hub.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Base URL of the hub, without a trailing slash.
    pub endpoint: String,
    /// The hub cache: the folder holding `models--owner--name` folders.
    pub cache_dir: PathBuf,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Look only in the cache, never on the network.
    pub offline: bool,
}

impl HubConfig {
    /// Reads the variables `huggingface_hub` reads: `HF_ENDPOINT`; `HF_HUB_CACHE` (or the legacy
    /// `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, where `HF_HOME` defaults to
    /// `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`; `HF_TOKEN` (or the legacy
    /// `HUGGING_FACE_HUB_TOKEN`), else the token file `HF_TOKEN_PATH` or `HF_HOME/token` that
    /// `huggingface-cli login` writes; `HF_HUB_OFFLINE` (1/true/yes/on).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// `from_env` over any source of variables, so that it can be tested without touching the
    /// process-global environment. Empty variables count as unset, as in `huggingface_hub`.
    fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let home_dir = || {
            var("HOME")
                .or_else(|| var("USERPROFILE"))
                .map(PathBuf::from)
        };
        let expand = |path: OsString| -> PathBuf {
            // `huggingface_hub` expands `~`; a value like `~/models` must not become `./~/models`.
            match (path.to_str().and_then(|p| p.strip_prefix("~/")), home_dir()) {
                (Some(rest), Some(home)) => home.join(rest),
                _ => PathBuf::from(path),
            }
        };
        let no_home = || {
            Error::Hub(
                "cannot locate the Hugging Face cache: HOME is not set; set HF_HOME or HF_HUB_CACHE"
                    .into(),
            )
        };

        let hf_home = match var("HF_HOME") {
            Some(home) => Some(expand(home)),
            None => var("XDG_CACHE_HOME")
                .map(|xdg| expand(xdg).join("huggingface"))
                .or_else(|| home_dir().map(|h| h.join(".cache").join("huggingface"))),
        };
        let cache_dir = match var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
            Some(dir) => expand(dir),
            None => hf_home.as_ref().ok_or_else(no_home)?.join("hub"),
        };

        let token_from_file = || {
            let path = match var("HF_TOKEN_PATH") {
                Some(path) => expand(path),
                None => hf_home.as_ref()?.join("token"),
            };
            std::fs::read_to_string(path).ok()
        };
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .and_then(|t| t.into_string().ok())
            .or_else(token_from_file)
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());

        let endpoint = var("HF_ENDPOINT")
            .and_then(|e| e.into_string().ok())
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());

        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            let v = v.to_string_lossy().to_ascii_lowercase();
            matches!(v.as_str(), "1" | "true" | "yes" | "on")
        });

        Ok(Self {
            endpoint,
            cache_dir,
            token,
            offline,
        })
    }
}

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

    let api = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
        .with_endpoint(config.endpoint.clone())
        .with_token(config.token.clone())
        .with_progress(progress)
        .with_user_agent("phi3", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| Error::Hub(format!("cannot set up the HTTP client: {e}")))?;
    let repo_handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    repo_handle
        .download(filename)
        .map_err(|e| download_error(e, config, repo, filename, revision))
}

/// The cached copy of `filename`, if any. Not `hf_hub::CacheRepo::get`: that one misses files
/// fetched by commit hash with `huggingface_hub` (which writes no `refs/<hash>`).
fn cached(config: &HubConfig, repo: &str, filename: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = config
        .cache_dir
        .join(Repo::new(repo.to_string(), RepoType::Model).folder_name());
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

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Turns hf-hub's error into one that says what the user can do about it.
fn download_error(
    err: ApiError,
    config: &HubConfig,
    repo: &str,
    filename: &str,
    revision: &str,
) -> Error {
    let endpoint = &config.endpoint;
    let msg = match err {
        ApiError::RequestError(err) => match *err {
            ureq::Error::Status(status, response) => {
                // The hub says which part is missing in `X-Error-Code`; its text may help too.
                let code = response.header("x-error-code").unwrap_or("").to_string();
                let detail = response
                    .header("x-error-message")
                    .map(|m| format!(" ({})", sanitize(m)))
                    .unwrap_or_default();
                match (status, code.as_str()) {
                    (404, "RepoNotFound") | (401, "RepoNotFound") => format!(
                        "repository {repo} not found on {endpoint}{detail}; if it is private or \
                         gated, set HF_TOKEN to a token that can read it"
                    ),
                    (404, "RevisionNotFound") => {
                        format!("revision {revision} not found in {repo} on {endpoint}{detail}")
                    }
                    (404, _) => format!(
                        "{filename} not found in {repo} at revision {revision} on \
                         {endpoint}{detail}"
                    ),
                    (401 | 403, _) => format!(
                        "{endpoint} refused access to {repo} (HTTP {status}){detail}; set HF_TOKEN \
                         to a token that can read it (gated repositories also need their terms \
                         accepted on the website)"
                    ),
                    _ => format!(
                        "{endpoint} answered HTTP {status} for {filename} in {repo} at revision \
                         {revision}{detail}"
                    ),
                }
            }
            ureq::Error::Transport(transport) => format!(
                "cannot reach {endpoint} ({transport}); check the network or HF_ENDPOINT, or set \
                 HF_HUB_OFFLINE=1 to use only files already in the cache"
            ),
        },
        ApiError::MissingHeader(header) | ApiError::InvalidHeader(header) => format!(
            "{endpoint} answered without a valid {header} header for {filename} in {repo}: is \
             HF_ENDPOINT a Hugging Face hub?"
        ),
        ApiError::LockAcquisition(lock) => format!(
            "another process is downloading {filename} (lock {}); wait for it, or delete the lock \
             file if no download is running",
            lock.display()
        ),
        ApiError::IoError(e) => format!(
            "downloading {filename} from {repo} into {} failed: {e}; running again resumes the \
             download",
            config.cache_dir.display()
        ),
        other => format!("downloading {filename} from {repo}: {other}"),
    };
    Error::Hub(msg)
}

/// A server-supplied header value made safe to show: no control characters, bounded length.
fn sanitize(s: &str) -> String {
    const MAX_CHARS: usize = 200;
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_CHARS)
        .collect()
}

fn invalid(what: &str, value: &str, why: &str) -> Error {
    Error::invalid_argument(format!("{what}: {value:?} {why}"))
}

/// `owner/name` with the characters the hub allows; `--` and `..` are refused as the hub
/// refuses them (`--` separates the parts of cache folder names).
fn validate_repo(repo: &str) -> Result<()> {
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
/// them, and it is put into the URL unescaped by hf-hub, so `?` and `#` cannot be sent.
fn validate_filename(filename: &str) -> Result<()> {
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
fn validate_revision(revision: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const ETAG: &str = "5d41402abc4b2a76b9719d911017c592aaaaaaaa";
    const CDN_ETAG: &str = "1f2e3d4c5b6a79880123456789abcdef00112233";

    /// A folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "phi3-hub-{tag}-{}-{n}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// What the fake hub serves at a path.
    #[derive(Clone)]
    enum Route {
        /// A file with the hub's metadata headers; Range requests are honoured.
        File { body: Vec<u8>, etag: &'static str },
        /// An LFS file: the hub answers 302 to a CDN with the metadata on the redirect.
        Redirect {
            location: String,
            etag: &'static str,
        },
        /// A plain file on the "CDN": no hub headers.
        Cdn(Vec<u8>),
        /// An error status with the hub's `X-Error-Code`.
        Status(u16, &'static str),
    }

    /// A stand-in for the hub: HTTP/1.1 on 127.0.0.1, one connection at a time, each closed
    /// after its response. It stops when dropped, and by itself after a minute at the latest.
    struct FakeHub {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        requests: Arc<Mutex<Vec<String>>>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakeHub {
        fn start(routes: HashMap<String, Route>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let thread = {
                let (stop, requests) = (stop.clone(), requests.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                // A broken connection fails the client, which the test sees.
                                let _ = serve(stream, &routes, &requests);
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                })
            };
            Self {
                addr,
                stop,
                requests,
                thread: Some(thread),
            }
        }

        fn endpoint(&self) -> String {
            format!("http://{}", self.addr)
        }

        /// Each request as "METHOD path" followed by its headers, lower-cased names.
        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }

        fn stop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    impl Drop for FakeHub {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn serve(
        stream: TcpStream,
        routes: &HashMap<String, Route>,
        log: &Mutex<Vec<String>>,
    ) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut fields = request_line.split_whitespace();
        let (method, path) = (
            fields.next().unwrap_or("").to_string(),
            fields.next().unwrap_or("").to_string(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let mut entry = format!("{method} {path}");
        for (name, value) in &headers {
            entry.push_str(&format!("\n{name}: {value}"));
        }
        log.lock().unwrap().push(entry);

        let range = headers.get("range").map(String::as_str);
        let (status, extra, body) = match routes.get(&path) {
            Some(Route::File { body, etag }) => {
                let hub = vec![
                    ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                    ("ETag".to_string(), format!("\"{etag}\"")),
                ];
                ranged(body, range, hub)
            }
            Some(Route::Cdn(body)) => ranged(body, range, Vec::new()),
            Some(Route::Redirect { location, etag }) => (
                302,
                vec![
                    ("Location".to_string(), location.clone()),
                    ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                    ("X-Linked-Etag".to_string(), format!("\"{etag}\"")),
                ],
                Vec::new(),
            ),
            Some(Route::Status(status, code)) => (
                *status,
                vec![("X-Error-Code".to_string(), code.to_string())],
                Vec::new(),
            ),
            None => (
                404,
                vec![("X-Error-Code".to_string(), "EntryNotFound".to_string())],
                Vec::new(),
            ),
        };
        let mut out = stream;
        write!(out, "HTTP/1.1 {status} Whatever\r\n")?;
        for (name, value) in &extra {
            write!(out, "{name}: {value}\r\n")?;
        }
        write!(
            out,
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        if method != "HEAD" {
            out.write_all(&body)?;
        }
        out.flush()
    }

    /// A 200, or a 206 for `Range: bytes=a-` / `bytes=a-b`; 416 for an unsatisfiable range.
    fn ranged(
        body: &[u8],
        range: Option<&str>,
        mut headers: Vec<(String, String)>,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        headers.push(("Accept-Ranges".into(), "bytes".into()));
        let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
            return (200, headers, body.to_vec());
        };
        let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
        let start: usize = start.parse().unwrap_or(usize::MAX);
        let end: usize = end
            .parse()
            .unwrap_or(usize::MAX)
            .min(body.len().wrapping_sub(1));
        if start >= body.len() || start > end {
            headers.push(("Content-Range".into(), format!("bytes */{}", body.len())));
            return (416, headers, Vec::new());
        }
        headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{end}/{}", body.len()),
        ));
        (206, headers, body[start..=end].to_vec())
    }

    fn test_bytes(len: usize) -> Vec<u8> {
        // Not all one byte, so that misplaced ranges show.
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn config(endpoint: String, cache: &TempDir) -> HubConfig {
        HubConfig {
            endpoint,
            cache_dir: cache.0.join("hub"),
            token: None,
            offline: false,
        }
    }

    fn hub_message(result: Result<PathBuf>) -> String {
        match result {
            Err(Error::Hub(msg)) => msg,
            other => panic!("expected Error::Hub, got {other:?}"),
        }
    }

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
        let cache = TempDir::new("download");
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

    #[test]
    fn follows_the_redirect_to_the_cdn() {
        let body = test_bytes(70_000);
        let hub = FakeHub::start(HashMap::from([(
            "/cdn/blob".to_string(),
            Route::Cdn(body.clone()),
        )]));
        // The route needs the address, known only once the server runs: serve it from a second.
        let hub2 = FakeHub::start(HashMap::from([(
            "/owner/lfs/resolve/main/big.gguf".to_string(),
            Route::Redirect {
                location: format!("{}/cdn/blob", hub.endpoint()),
                etag: CDN_ETAG,
            },
        )]));
        let cache = TempDir::new("redirect");
        let cfg = config(hub2.endpoint(), &cache);
        // With the progress bar: indicatif draws it on stderr, hidden when that is not a terminal.
        let path = fetch_with(&cfg, "owner/lfs", "big.gguf", "main", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        assert!(cfg
            .cache_dir
            .join("models--owner--lfs/blobs")
            .join(CDN_ETAG)
            .is_file());
    }

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
        let cache = TempDir::new("subfolder");
        let mut cfg = config(hub.endpoint(), &cache);
        let path = fetch_with(&cfg, "owner/model", "q4/model.gguf", "refs/pr/1", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        cfg.offline = true;
        assert_eq!(
            fetch_with(&cfg, "owner/model", "q4/model.gguf", "refs/pr/1", false).unwrap(),
            path
        );
    }

    #[test]
    fn http_errors_say_what_is_wrong() {
        let hub = FakeHub::start(HashMap::from([
            (
                "/owner/gone/resolve/main/model.gguf".to_string(),
                Route::Status(404, "RepoNotFound"),
            ),
            (
                "/owner/private/resolve/main/model.gguf".to_string(),
                Route::Status(401, ""),
            ),
            (
                "/owner/gated/resolve/main/model.gguf".to_string(),
                Route::Status(403, "GatedRepo"),
            ),
            (
                "/owner/broken/resolve/main/model.gguf".to_string(),
                Route::Status(500, ""),
            ),
        ]));
        let cache = TempDir::new("errors");
        let cfg = config(hub.endpoint(), &cache);
        let fail =
            |repo: &str, file: &str| hub_message(fetch_with(&cfg, repo, file, "main", false));

        let msg = fail("owner/model", "missing.gguf");
        assert!(
            msg.contains("not found") && msg.contains("missing.gguf"),
            "{msg}"
        );
        let msg = fail("owner/gone", "model.gguf");
        assert!(msg.contains("repository owner/gone not found"), "{msg}");
        for repo in ["owner/private", "owner/gated"] {
            let msg = fail(repo, "model.gguf");
            assert!(msg.contains("HF_TOKEN") && msg.contains(repo), "{msg}");
        }
        let msg = fail("owner/broken", "model.gguf");
        assert!(msg.contains("HTTP 500"), "{msg}");
        // Nothing half-made is left where the cache would find it.
        assert!(cached(&cfg, "owner/model", "missing.gguf", "main").is_none());
    }

    #[test]
    fn an_unreachable_endpoint_is_named() {
        // A port that was just free: nothing listens there any more.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cache = TempDir::new("refused");
        let cfg = config(format!("http://{addr}"), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(
            msg.contains(&cfg.endpoint) && msg.contains("cannot reach"),
            "{msg}"
        );
    }

    #[test]
    fn a_server_that_is_not_a_hub_is_reported() {
        let hub = FakeHub::start(HashMap::from([(
            "/owner/model/resolve/main/m.gguf".to_string(),
            Route::Cdn(test_bytes(10)),
        )]));
        let cache = TempDir::new("nothub");
        let cfg = config(hub.endpoint(), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(msg.contains("HF_ENDPOINT"), "{msg}");
    }

    #[test]
    fn bad_arguments_are_rejected_by_name() {
        let cache = TempDir::new("args");
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

    #[test]
    fn config_follows_the_huggingface_hub_variables() {
        let dir = TempDir::new("env");
        std::fs::write(dir.0.join("token"), "hf_from_file\n").unwrap();
        let dir_str = dir.0.to_str().unwrap().to_string();
        let from = |vars: &[(&str, &str)]| {
            let vars: HashMap<String, OsString> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v)))
                .collect();
            HubConfig::from_vars(|name| vars.get(name).cloned()).unwrap()
        };

        let cfg = from(&[("HOME", "/home/u")]);
        assert_eq!(cfg.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(
            cfg.cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(cfg.token, None);
        assert!(!cfg.offline);

        let cfg = from(&[
            ("HOME", "/home/u"),
            ("HF_HOME", &dir_str),
            ("HF_ENDPOINT", "http://mirror.local/"),
            ("HF_HUB_OFFLINE", "1"),
        ]);
        assert_eq!(cfg.endpoint, "http://mirror.local");
        assert_eq!(cfg.cache_dir, dir.0.join("hub"));
        assert_eq!(cfg.token.as_deref(), Some("hf_from_file"));
        assert!(cfg.offline);

        let cfg = from(&[
            ("HF_HOME", &dir_str),
            ("HF_HUB_CACHE", "~/hubcache"),
            ("HOME", "/home/u"),
            ("HF_TOKEN", "hf_env"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(cfg.cache_dir, PathBuf::from("/home/u/hubcache"));
        assert_eq!(cfg.token.as_deref(), Some("hf_env"));
        assert!(!cfg.offline);

        let cfg = from(&[("XDG_CACHE_HOME", "/xdg"), ("HF_HUB_OFFLINE", "TRUE")]);
        assert_eq!(cfg.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
        assert!(cfg.offline);

        let err = HubConfig::from_vars(|_| None).unwrap_err();
        assert!(err.to_string().contains("HF_HOME"), "{err}");
    }
}
