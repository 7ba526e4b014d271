//! The hub's configuration: its address, the cache folder, the token, offline mode and the
//! timeouts. They are read from the variables `huggingface_hub` reads, with its defaults, so that
//! phi3 and Python's tools share one cache and one login.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// `huggingface_hub`'s defaults for `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tempfile::TempDir;

    use super::*;

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
