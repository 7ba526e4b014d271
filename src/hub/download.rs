//! Downloading a file from the hub: a metadata request whose answer names the file's commit and
//! blob (and its CDN address), then the download into a `.part` file, resumed where a previous
//! one stopped. The server is not trusted, so every connection has timeouts, a stalled body
//! fails, and nothing is written past the size the server announced or the free space; errors
//! say what the user can do about them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::cache::{create_parent, free_space, lock};
use super::config::HubConfig;
use super::validate::{is_commit_hash, is_plain_name, sanitize};
use crate::{Error, Result};

/// Redirects followed before a request fails (the hub needs one, to its CDN).
const MAX_REDIRECTS: u32 = 10;

/// A download that brings less than this in a timeout's time has stalled.
const MIN_BYTES_PER_TIMEOUT: u64 = 1 << 10;

/// What the hub says about a file: where to download it, and under which names to cache it.
pub(super) struct Metadata {
    pub(super) commit: String,
    pub(super) etag: String,
    pub(super) url: String,
}

/// A file of a repository at a revision, to be fetched from the hub.
pub(super) struct RepoFile<'a> {
    pub(super) config: &'a HubConfig,
    pub(super) repo: &'a str,
    pub(super) filename: &'a str,
    pub(super) revision: &'a str,
}

impl RepoFile<'_> {
    /// Asks the hub for the file's first byte, as `huggingface_hub` does: the answer's headers
    /// name the commit and the blob. Redirects within the hub (a renamed repository) are
    /// followed; one elsewhere is the file's CDN, whose address is where to download from.
    pub(super) fn metadata(&self) -> Result<Metadata> {
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
    pub(super) fn download(&self, url: &str, blob: &Path, progress: bool) -> Result<()> {
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

    pub(super) fn io_error(&self, e: &std::io::Error) -> Error {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tempfile::TempDir;

    use crate::hub::cache::cached;
    use crate::hub::fake_hub::{
        config, hostile, hub_message, test_bytes, FakeHub, Misbehaviour, Route, COMMIT, ETAG,
    };
    use crate::hub::fetch_with;

    const CDN_ETAG: &str = "1f2e3d4c5b6a79880123456789abcdef00112233";

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

    /// The error of a fetch from a hub that misbehaves so, and the bytes of the partial file it left.
    fn refused_fetch(misbehaviour: Misbehaviour) -> (String, u64) {
        let hub = hostile(COMMIT, ETAG, misbehaviour);
        let cache = TempDir::new().unwrap();
        let cfg = config(hub.endpoint(), &cache);
        let msg = hub_message(fetch_with(&cfg, "owner/model", "m.gguf", "main", false));
        let part = cfg
            .cache_dir
            .join("models--owner--model/blobs")
            .join(format!("{ETAG}.part"));
        (msg, std::fs::metadata(&part).unwrap().len())
    }

    #[test]
    fn sizes_past_the_announced_one_or_the_disk_are_refused() {
        let (msg, kept) = refused_fetch(Misbehaviour::Overflow);
        assert!(msg.contains("more of m.gguf than the 50000 bytes"), "{msg}");
        assert!(kept <= 50_000);

        let (msg, kept) = refused_fetch(Misbehaviour::Huge);
        assert!(msg.contains("bytes free"), "{msg}");
        assert_eq!(kept, 0);
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
}
