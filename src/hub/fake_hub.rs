//! A stand-in for the hub in tests, so that downloads are tested with no network: a small HTTP
//! server on 127.0.0.1 serving files with the hub's headers, redirects to a "CDN", the hub's
//! errors, and hostile answers (names that would escape the cache, stalls, bodies longer than
//! announced, cut connections); plus the helpers the tests share.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::HubConfig;
use crate::{Error, Result};

pub(super) const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub(super) const ETAG: &str = "5d41402abc4b2a76b9719d911017c592aaaaaaaa";

/// What the fake hub serves at a path.
#[derive(Clone)]
pub(super) enum Route {
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
pub(super) enum Misbehaviour {
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
pub(super) struct FakeHub {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    pub(super) fn start(routes: HashMap<String, Route>) -> Self {
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

    pub(super) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Each request as "METHOD path" followed by its headers, lower-cased names.
    pub(super) fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    pub(super) fn stop(&mut self) {
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
        // The whole body announced, half of it sent.
        let send_half = |out: &mut TcpStream| -> std::io::Result<()> {
            let header = partial(body.len());
            write!(out, "{header}Content-Length: {}\r\n\r\n", body.len())?;
            out.write_all(&body[..half])?;
            out.flush()
        };
        match (range, download) {
            (Some("bytes=0-0"), _) | (_, Misbehaviour::None) => {}
            (_, Misbehaviour::Stall) => {
                send_half(&mut out)?;
                // Held open by a thread of its own, so that the hub serves the next request.
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(30));
                    drop(out);
                });
                return Ok(());
            }
            (_, Misbehaviour::Overflow | Misbehaviour::Huge) => {
                // More than announced, or an announced size no disk holds.
                let announced = match download {
                    Misbehaviour::Overflow => half,
                    _ => 1 << 62,
                };
                write!(out, "{}\r\n", partial(announced))?;
                out.write_all(body)?;
                return out.flush();
            }
            (_, Misbehaviour::CutOnce(cut)) => {
                if !cut.swap(true, Ordering::Relaxed) {
                    return send_half(&mut out);
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

/// A file's bytes for a test.
pub(super) fn test_bytes(len: usize) -> Vec<u8> {
    // Not all one byte, so that misplaced ranges show.
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A configuration for the hub at `endpoint`, caching under `cache`, with short timeouts.
pub(super) fn config(endpoint: String, cache: &TempDir) -> HubConfig {
    HubConfig {
        endpoint,
        cache_dir: cache.path().join("hub"),
        token: None,
        offline: false,
        metadata_timeout: Duration::from_secs(5),
        download_timeout: Duration::from_secs(5),
    }
}

/// The message of an `Error::Hub`; anything else fails the test.
pub(super) fn hub_message(result: Result<PathBuf>) -> String {
    match result {
        Err(Error::Hub(msg)) => msg,
        other => panic!("expected Error::Hub, got {other:?}"),
    }
}

/// A hostile hub serving `owner/model`'s `m.gguf` at `main`.
pub(super) fn hostile(commit: &'static str, etag: &'static str, download: Misbehaviour) -> FakeHub {
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
