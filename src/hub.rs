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

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

pub const DEFAULT_REPO: &str = "microsoft/Phi-3-mini-4k-instruct-gguf";
pub const DEFAULT_FILE: &str = "Phi-3-mini-4k-instruct-q4.gguf";
pub const DEFAULT_REVISION: &str = "main";

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// `huggingface_hub`'s defaults for `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Redirects followed before a request fails (the hub needs one, to its CDN).
const MAX_REDIRECTS: u32 = 10;

/// A download that brings less than this in a timeout's time has stalled.
const MIN_BYTES_PER_TIMEOUT: u64 = 1 << 10;

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
    /// The whole metadata request (`HF_HUB_ETAG_TIMEOUT`).
    pub metadata_timeout: Duration,
    /// Connecting, and each read of a download (`HF_HUB_DOWNLOAD_TIMEOUT`).
    pub download_timeout: Duration,
}

impl HubConfig {
    /// Reads the variables `huggingface_hub` reads: `HF_ENDPOINT`; `HF_HUB_CACHE` (or the legacy
    /// `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, where `HF_HOME` defaults to
    /// `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`; `HF_TOKEN` (or the legacy
    /// `HUGGING_FACE_HUB_TOKEN`), else the token file `HF_TOKEN_PATH` or `HF_HOME/token` that
    /// `huggingface-cli login` writes; `HF_HUB_OFFLINE` (1/true/yes/on); `HF_HUB_ETAG_TIMEOUT`
    /// and `HF_HUB_DOWNLOAD_TIMEOUT` (seconds, 10 by default).
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

        let timeout = |name: &str| match var(name) {
            None => Ok(DEFAULT_TIMEOUT),
            Some(value) => value
                .to_str()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|&secs| secs > 0.0)
                .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                .ok_or_else(|| {
                    Error::Hub(format!(
                        "{name}={value:?} is not a positive number of seconds"
                    ))
                }),
        };

        Ok(Self {
            endpoint,
            cache_dir,
            token,
            offline,
            metadata_timeout: timeout("HF_HUB_ETAG_TIMEOUT")?,
            download_timeout: timeout("HF_HUB_DOWNLOAD_TIMEOUT")?,
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

/// `<cache>/models--owner--name`.
fn repo_dir(config: &HubConfig, repo: &str) -> PathBuf {
    config
        .cache_dir
        .join(format!("models--{}", repo.replace('/', "--")))
}

/// What the hub says about a file: where to download it, and under which names to cache it.
struct Metadata {
    commit: String,
    etag: String,
    url: String,
}

/// A file of a repository at a revision, to be fetched from the hub.
struct RepoFile<'a> {
    config: &'a HubConfig,
    repo: &'a str,
    filename: &'a str,
    revision: &'a str,
}

impl RepoFile<'_> {
    /// Asks the hub for the file's first byte, as `huggingface_hub` does: the answer's headers
    /// name the commit and the blob. Redirects within the hub (a renamed repository) are
    /// followed; one elsewhere is the file's CDN, whose address is where to download from.
    fn metadata(&self) -> Result<Metadata> {
        let agent = agent(self.config.metadata_timeout, 0)
            .timeout(self.config.metadata_timeout)
            .build();
        let mut url = format!(
            "{}/{}/resolve/{}/{}",
            self.config.endpoint,
            self.repo,
            percent_encode(self.revision, false),
            percent_encode(self.filename, true)
        );
        for _ in 0..=MAX_REDIRECTS {
            let response = self
                .request(&agent, &url)
                .set("Range", "bytes=0-0")
                .call()
                .map_err(|e| self.request_error(e))?;
            if !(300..400).contains(&response.status()) {
                return self.metadata_from(&response, url);
            }
            let location = response
                .header("location")
                .ok_or_else(|| self.bad_header("Location", None))?;
            if location.starts_with('/') && !location.starts_with("//") {
                url = format!("{}{location}", origin(&url));
                continue;
            }
            if !location.starts_with("https://") && !location.starts_with("http://") {
                return Err(self.bad_header("Location", Some(location)));
            }
            return self.metadata_from(&response, location.to_string());
        }
        Err(Error::Hub(format!(
            "{} redirected more than {MAX_REDIRECTS} times for {} in {}",
            self.config.endpoint, self.filename, self.repo
        )))
    }

    fn metadata_from(&self, response: &ureq::Response, url: String) -> Result<Metadata> {
        let header = |name: &'static str| {
            response
                .header(name)
                .ok_or_else(|| self.bad_header(name, None))
        };
        let commit = header("X-Repo-Commit")?.to_string();
        if !is_commit_hash(&commit) {
            return Err(self.bad_header("X-Repo-Commit", Some(&commit)));
        }
        let etag = response
            .header("x-linked-etag")
            .map_or_else(|| header("ETag"), Ok)?;
        let etag = etag.trim().trim_start_matches("W/").replace('"', "");
        if !is_plain_name(&etag) {
            return Err(self.bad_header("ETag", Some(&etag)));
        }
        Ok(Metadata { commit, etag, url })
    }

    /// Downloads `url` into `blob`, through `blob.part` (kept, and resumed, if the download
    /// stops) under `blob.lock` (two processes downloading the same file would mix it up).
    fn download(&self, url: &str, blob: &Path, progress: bool) -> Result<()> {
        let io = |e: std::io::Error| self.io_error(&e);
        create_parent(blob).map_err(io)?;
        let lock_path = blob.with_extension("lock");
        let _lock = lock(&lock_path).map_err(|e| {
            Error::Hub(format!(
                "another process is downloading {} (lock {}: {e}); wait for it, or delete the \
                 lock file if no download is running",
                self.filename,
                lock_path.display()
            ))
        })?;
        // It may have finished while this one waited for the lock.
        if blob.is_file() {
            return Ok(());
        }
        let part_path = blob.with_extension("part");
        let mut part = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part_path)
            .map_err(io)?;
        let mut start = part.metadata().map_err(io)?.len();

        let agent = agent(self.config.download_timeout, MAX_REDIRECTS).build();
        let response = loop {
            let response = self
                .request(&agent, url)
                .set("Range", &format!("bytes={start}-"))
                .call();
            match response {
                // Nothing from `start` on: the part file is whole, or longer than the file.
                Err(ureq::Error::Status(416, response)) if start > 0 => {
                    let size = response
                        .header("content-range")
                        .and_then(|r| r.strip_prefix("bytes */")?.trim().parse::<u64>().ok());
                    if size == Some(start) {
                        return self.finish(part, &part_path, blob);
                    }
                    part.set_len(0).map_err(io)?;
                    start = 0;
                }
                other => break other.map_err(|e| self.request_error(e))?,
            }
        };
        let (offset, total) = self.body_range(&response, start)?;
        if offset == 0 {
            part.set_len(0).map_err(io)?;
        }
        let remaining = total - offset;
        if let Some(free) = free_space(blob) {
            if remaining > free {
                return Err(Error::Hub(format!(
                    "{} from {} is {total} bytes, {remaining} of them still to download, but \
                     {} has {free} bytes free",
                    self.filename,
                    self.repo,
                    self.config.cache_dir.display()
                )));
            }
        }

        let bar = progress_bar(progress, total, offset, self.filename);
        let received = self.copy_body(response.into_reader(), &mut part, remaining, &bar)?;
        bar.finish_and_clear();
        if received < remaining {
            return Err(Error::Hub(format!(
                "downloading {} from {}: the connection ended after {} of {total} bytes; \
                 running again resumes the download",
                self.filename,
                self.repo,
                offset + received
            )));
        }
        self.finish(part, &part_path, blob)
    }

    /// Moves a complete part file into the cache.
    fn finish(&self, part: File, part_path: &Path, blob: &Path) -> Result<()> {
        let io = |e: std::io::Error| self.io_error(&e);
        part.sync_all().map_err(io)?;
        drop(part);
        std::fs::rename(part_path, blob).map_err(io)
    }

    /// Where the body starts in the file, and the file's size: a 206 answer to the range
    /// asked for, or a 200 with the whole file.
    fn body_range(&self, response: &ureq::Response, start: u64) -> Result<(u64, u64)> {
        let number = |name: &'static str, text: Option<&str>| {
            text.and_then(|t| t.trim().parse::<u64>().ok())
                .ok_or_else(|| self.bad_header(name, response.header(name)))
        };
        match response.status() {
            206 => {
                // `bytes <first>-<last>/<size>`
                let range = response.header("content-range").unwrap_or("");
                let (first, size) = range
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split_once('/'))
                    .map(|(span, size)| (span.split('-').next(), Some(size)))
                    .unwrap_or((None, None));
                let first = number("Content-Range", first)?;
                let size = number("Content-Range", size)?;
                if first != start || first > size {
                    return Err(self.bad_header("Content-Range", Some(range)));
                }
                Ok((first, size))
            }
            200 => Ok((
                0,
                number("Content-Length", response.header("content-length"))?,
            )),
            status => Err(Error::Hub(format!(
                "{} answered HTTP {status} for {} in {}",
                self.config.endpoint, self.filename, self.repo
            ))),
        }
    }

    /// Copies at most `remaining` bytes; more is an error, as is a stall.
    fn copy_body(
        &self,
        mut body: impl Read,
        part: &mut File,
        remaining: u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<u64> {
        let timeout = self.config.download_timeout;
        let mut buf = vec![0u8; 256 << 10];
        let (mut received, mut window_start, mut window_bytes) = (0u64, Instant::now(), 0u64);
        loop {
            let n = body.read(&mut buf).map_err(|e| self.io_error(&e))?;
            if n == 0 {
                return Ok(received);
            }
            received += n as u64;
            if received > remaining {
                return Err(Error::Hub(format!(
                    "{} sent more of {} than the {remaining} bytes it announced",
                    self.config.endpoint, self.filename
                )));
            }
            part.write_all(&buf[..n]).map_err(|e| self.io_error(&e))?;
            bar.inc(n as u64);
            window_bytes += n as u64;
            if window_start.elapsed() >= timeout {
                if window_bytes < MIN_BYTES_PER_TIMEOUT {
                    return Err(Error::Hub(format!(
                        "downloading {} from {}: the download stalled (under \
                         {MIN_BYTES_PER_TIMEOUT} bytes in {timeout:?}); running again resumes it",
                        self.filename, self.repo
                    )));
                }
                (window_start, window_bytes) = (Instant::now(), 0);
            }
        }
    }

    /// A GET with the user agent, and the token when it goes to the hub itself.
    fn request(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let request = agent.get(url);
        match &self.config.token {
            Some(token) if origin(url) == origin(&self.config.endpoint) => {
                request.set("Authorization", &format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    /// An error that says what the user can do about it.
    fn request_error(&self, err: ureq::Error) -> Error {
        let (endpoint, repo, filename, revision) = (
            &self.config.endpoint,
            self.repo,
            self.filename,
            self.revision,
        );
        let msg = match err {
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
            ureq::Error::Transport(transport) => match transport.kind() {
                ureq::ErrorKind::TooManyRedirects => format!(
                    "{endpoint} redirected more than {MAX_REDIRECTS} times for {filename} in {repo}"
                ),
                _ => format!(
                    "cannot reach {endpoint} ({transport}); check the network or HF_ENDPOINT, or \
                     set HF_HUB_OFFLINE=1 to use only files already in the cache"
                ),
            },
        };
        Error::Hub(msg)
    }

    fn bad_header(&self, name: &str, value: Option<&str>) -> Error {
        let value = value.map_or_else(
            || "without it".to_string(),
            |v| format!("with {:?}", sanitize(v)),
        );
        Error::Hub(format!(
            "{} answered {value} as the {name} header for {} in {}: is HF_ENDPOINT a Hugging \
             Face hub?",
            self.config.endpoint, self.filename, self.repo
        ))
    }

    fn io_error(&self, e: &std::io::Error) -> Error {
        Error::Hub(format!(
            "downloading {} from {} into {} failed: {e}; running again resumes the download",
            self.filename,
            self.repo,
            self.config.cache_dir.display()
        ))
    }
}

/// An HTTP client whose connections give up after `timeout` without progress.
fn agent(timeout: Duration, redirects: u32) -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .timeout_write(timeout)
        .redirects(redirects)
        // The token goes to the hub, not to the CDN it redirects to.
        .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
        .user_agent(concat!("phi3/", env!("CARGO_PKG_VERSION")))
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..]
        .find('/')
        .map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

/// Percent-encodes all but unreserved characters (and `/` where `keep_slashes`), as
/// `huggingface_hub` quotes revisions (`refs%2Fpr%2F1`) and file names.
fn percent_encode(text: &str, keep_slashes: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slashes && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A name that is one plain path component: letters, digits, `-` and `_`. Hub ETags are
/// hashes (SHA-1 for files in git, SHA-256 for LFS files).
fn is_plain_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::create_dir_all(parent),
        None => Ok(()),
    }
}

/// Takes `path`'s lock, waiting a few seconds for another holder.
fn lock(path: &Path) -> std::io::Result<File> {
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

/// Points the snapshot's `filename` at the blob, as `huggingface_hub` does: a relative symlink
/// (a copy where symlinks cannot be made). An existing one is kept.
fn link(blob: &Path, pointer: &Path, filename: &str) -> std::io::Result<()> {
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

/// Bytes free for an unprivileged user on the file system holding `path`'s folder.
#[cfg(unix)]
fn free_space(path: &Path) -> Option<u64> {
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
fn free_space(_path: &Path) -> Option<u64> {
    None
}

/// A progress bar on stderr, drawn only when that is a terminal.
fn progress_bar(show: bool, total: u64, done: u64, filename: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_message(filename.rsplit('/').next().unwrap_or(filename).to_string());
    bar.set_position(done);
    bar
}

/// The cached copy of `filename`, if any; found by commit hash too, for which
/// `huggingface_hub` writes no `refs/<hash>`.
fn cached(config: &HubConfig, repo: &str, filename: &str, revision: &str) -> Option<PathBuf> {
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

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
/// them; `\\`, `?` and `#` are refused, as no hub file name has them.
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use tempfile::TempDir;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const ETAG: &str = "5d41402abc4b2a76b9719d911017c592aaaaaaaa";
    const CDN_ETAG: &str = "1f2e3d4c5b6a79880123456789abcdef00112233";

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
        /// A hostile server's file: any commit and ETag in its metadata, and a download that
        /// misbehaves as `download` says.
        Hostile {
            body: Vec<u8>,
            commit: &'static str,
            etag: &'static str,
            download: Misbehaviour,
        },
        /// A redirect to itself, forever.
        Loop,
    }

    /// How a hostile server's download goes.
    #[derive(Clone)]
    enum Misbehaviour {
        /// It does not: the file, with ranges honoured.
        None,
        /// Half the body, then nothing for 30 s.
        Stall,
        /// The whole body after announcing half of it.
        Overflow,
        /// A size of 2^62 bytes announced.
        Huge,
        /// Half the body and the connection closed, the first time only.
        CutOnce(Arc<AtomicBool>),
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
        let mut out = stream;
        if let Some(Route::Hostile {
            body,
            commit,
            etag,
            download,
        }) = routes.get(&path)
        {
            let hub = format!("X-Repo-Commit: {commit}\r\nETag: \"{etag}\"\r\n");
            let half = body.len() / 2;
            let partial = |announced: usize| {
                format!(
                    "HTTP/1.1 206 Partial\r\n{hub}Content-Range: bytes 0-{}/{announced}\r\n\
                     Connection: close\r\n",
                    announced.saturating_sub(1)
                )
            };
            match (range, download) {
                (Some("bytes=0-0"), _) | (_, Misbehaviour::None) => {}
                (_, Misbehaviour::Stall) => {
                    write!(
                        out,
                        "{}Content-Length: {}\r\n\r\n",
                        partial(body.len()),
                        body.len()
                    )?;
                    out.write_all(&body[..half])?;
                    out.flush()?;
                    // Held open by a thread of its own, so that the hub serves the next request.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(30));
                        drop(out);
                    });
                    return Ok(());
                }
                (_, Misbehaviour::Overflow) => {
                    write!(out, "{}\r\n", partial(half))?;
                    out.write_all(body)?;
                    return out.flush();
                }
                (_, Misbehaviour::Huge) => {
                    write!(out, "{}\r\n", partial(1 << 62))?;
                    out.write_all(body)?;
                    return out.flush();
                }
                (_, Misbehaviour::CutOnce(cut)) => {
                    if !cut.swap(true, Ordering::Relaxed) {
                        write!(
                            out,
                            "{}Content-Length: {}\r\n\r\n",
                            partial(body.len()),
                            body.len()
                        )?;
                        out.write_all(&body[..half])?;
                        return out.flush();
                    }
                }
            }
        }
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
            Some(Route::Hostile {
                body, commit, etag, ..
            }) => {
                let hub = vec![
                    ("X-Repo-Commit".to_string(), commit.to_string()),
                    ("ETag".to_string(), format!("\"{etag}\"")),
                ];
                ranged(body, range, hub)
            }
            Some(Route::Loop) => (
                302,
                vec![("Location".to_string(), path.clone())],
                Vec::new(),
            ),
            None => (
                404,
                vec![("X-Error-Code".to_string(), "EntryNotFound".to_string())],
                Vec::new(),
            ),
        };
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
            cache_dir: cache.path().join("hub"),
            token: None,
            offline: false,
            metadata_timeout: Duration::from_secs(5),
            download_timeout: Duration::from_secs(5),
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
        let cache = TempDir::new().unwrap();
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
        let cache = TempDir::new().unwrap();
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
        let cache = TempDir::new().unwrap();
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
        let cache = TempDir::new().unwrap();
        let cfg = config(hub.endpoint(), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(msg.contains("HF_ENDPOINT"), "{msg}");
    }

    fn hostile(commit: &'static str, etag: &'static str, download: Misbehaviour) -> FakeHub {
        FakeHub::start(HashMap::from([(
            "/owner/model/resolve/main/m.gguf".to_string(),
            Route::Hostile {
                body: test_bytes(100_000),
                commit,
                etag,
                download,
            },
        )]))
    }

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
    fn a_stalled_download_times_out_and_resumes_later() {
        let body = test_bytes(100_000);
        let hub = hostile(COMMIT, ETAG, Misbehaviour::Stall);
        let cache = TempDir::new().unwrap();
        let mut cfg = config(hub.endpoint(), &cache);
        cfg.download_timeout = Duration::from_millis(500);
        let start = Instant::now();
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(
            msg.contains("timed out") && msg.contains("resumes"),
            "{msg}"
        );
        // What came is kept for the next attempt; nothing is in the cache's snapshots.
        let part = cfg
            .cache_dir
            .join("models--owner--model/blobs")
            .join(format!("{ETAG}.part"));
        assert_eq!(std::fs::read(part).unwrap(), &body[..50_000]);
        assert!(cached(&cfg, "owner/model", "m.gguf", "main").is_none());
    }

    #[test]
    fn a_silent_server_times_out() {
        // Connections are accepted by the kernel, never answered.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cache = TempDir::new().unwrap();
        let mut cfg = config(format!("http://{}", listener.local_addr().unwrap()), &cache);
        cfg.metadata_timeout = Duration::from_millis(500);
        let start = Instant::now();
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(msg.contains("timed out"), "{msg}");
    }

    #[test]
    fn sizes_past_the_announced_one_or_the_disk_are_refused() {
        let hub = hostile(COMMIT, ETAG, Misbehaviour::Overflow);
        let cache = TempDir::new().unwrap();
        let cfg = config(hub.endpoint(), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(msg.contains("more of m.gguf than the 50000 bytes"), "{msg}");
        let part = cfg
            .cache_dir
            .join("models--owner--model/blobs")
            .join(format!("{ETAG}.part"));
        assert!(std::fs::metadata(&part).unwrap().len() <= 50_000);

        let hub = hostile(COMMIT, ETAG, Misbehaviour::Huge);
        let cache = TempDir::new().unwrap();
        let cfg = config(hub.endpoint(), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(msg.contains("bytes free"), "{msg}");
        let part = cfg
            .cache_dir
            .join("models--owner--model/blobs")
            .join(format!("{ETAG}.part"));
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 0);
    }

    #[test]
    fn redirect_loops_end() {
        let hub = FakeHub::start(HashMap::from([(
            "/owner/model/resolve/main/m.gguf".to_string(),
            Route::Loop,
        )]));
        let cache = TempDir::new().unwrap();
        let cfg = config(hub.endpoint(), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(msg.contains("redirected more than 10 times"), "{msg}");
        assert_eq!(hub.requests().len(), 11);
    }

    #[test]
    fn an_interrupted_download_resumes() {
        let body = test_bytes(100_000);
        let hub = hostile(COMMIT, ETAG, Misbehaviour::CutOnce(Arc::default()));
        let cache = TempDir::new().unwrap();
        let cfg = config(hub.endpoint(), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        assert!(
            msg.contains("closed before") && msg.contains("resumes"),
            "{msg}"
        );
        let path = fetch_with(&cfg, "owner/model", "m.gguf", "main", false).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), body);
        let requests = hub.requests();
        assert!(
            requests.last().unwrap().contains("\nrange: bytes=50000-"),
            "{requests:?}"
        );
    }

    #[test]
    fn part_files_that_are_whole_or_too_long() {
        let body = test_bytes(100_000);
        let hub = hostile(COMMIT, ETAG, Misbehaviour::None);
        // Whole: the hub answers that nothing is left, and the part is used. Too long: the
        // download starts over.
        for (extra, requests) in [(0, 2), (10, 3)] {
            let before = hub.requests().len();
            let cache = TempDir::new().unwrap();
            let cfg = config(hub.endpoint(), &cache);
            let blobs = cfg.cache_dir.join("models--owner--model/blobs");
            std::fs::create_dir_all(&blobs).unwrap();
            let mut part = body.clone();
            part.extend(vec![7; extra]);
            std::fs::write(blobs.join(format!("{ETAG}.part")), part).unwrap();
            let path = fetch_with(&cfg, "owner/model", "m.gguf", "main", false).unwrap();
            assert_eq!(std::fs::read(path).unwrap(), body, "{extra}");
            assert_eq!(hub.requests().len() - before, requests, "{extra}");
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

    #[test]
    fn config_follows_the_huggingface_hub_variables() {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("token"), "hf_from_file\n").unwrap();
        let dir_str = dir.path().to_str().unwrap().to_string();
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
        assert_eq!(cfg.cache_dir, dir.path().join("hub"));
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

        // Timeouts: 10 s unless set, in seconds.
        let cfg = from(&[("HOME", "/home/u")]);
        assert_eq!(cfg.metadata_timeout, Duration::from_secs(10));
        assert_eq!(cfg.download_timeout, Duration::from_secs(10));
        let cfg = from(&[
            ("HOME", "/home/u"),
            ("HF_HUB_ETAG_TIMEOUT", "3"),
            ("HF_HUB_DOWNLOAD_TIMEOUT", "0.5"),
        ]);
        assert_eq!(cfg.metadata_timeout, Duration::from_secs(3));
        assert_eq!(cfg.download_timeout, Duration::from_millis(500));
        for bad in ["0", "-1", "soon", "inf"] {
            let vars = [("HOME", "/home/u"), ("HF_HUB_DOWNLOAD_TIMEOUT", bad)];
            let err = HubConfig::from_vars(|name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            })
            .unwrap_err();
            assert!(err.to_string().contains("HF_HUB_DOWNLOAD_TIMEOUT"), "{err}");
        }
    }
}
