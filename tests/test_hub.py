"""Downloads through the real hub client, against a local server standing in for the hub;
then offline, from the cache alone."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import fixture_path
from hub_server import COMMIT, MODES, HubServer
from phi3 import DownloadError, Phi3

REPO = "tiny-owner/tiny-phi3-gguf"
FILE = "tiny-phi3-haiku-q4_k_m.gguf"


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return home


def test_download_then_offline(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer(REPO, {FILE: fixture_path(FILE)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = Phi3(REPO, filename=FILE)
        assert hub.requests, "the hub was asked"
    cached = hub_env / "hub" / "models--tiny-owner--tiny-phi3-gguf" / "snapshots" / COMMIT / FILE
    assert cached.read_bytes() == fixture_path(FILE).read_bytes()
    assert Path(model.path).resolve() == cached.resolve()
    assert model.generate("Write a haiku about ice hockey", temperature=0).startswith("Puck")

    # The server is gone: offline mode finds the file in the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = Phi3(REPO, filename=FILE)
    assert Path(again.path).resolve() == cached.resolve()


def test_offline_without_cache_says_so(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline"):
        Phi3(REPO, filename=FILE)


def test_missing_file_on_the_hub(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer(REPO, {}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(DownloadError, match="not found"):
            Phi3(REPO, filename="nope.gguf")


def test_unreachable_hub(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match=re.escape("127.0.0.1:9")):
        Phi3(REPO, filename=FILE)


def test_repo_without_filename() -> None:
    with pytest.raises(ValueError, match="filename"):
        Phi3("someone/some-repo")


# What each hostile hub's error says.
HOSTILE_ERRORS = {
    "etag-traversal": "ETag",
    "commit-traversal": "X-Repo-Commit",
    "stall-headers": "timed out",
    "stall-body": "timed out",
    "huge-length": "bytes free",
    "long-body": "than the .* bytes it announced",
    "redirect-loop": "redirected more than",
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_hostile_hub(hub_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    with HubServer(REPO, {FILE: fixture_path(FILE)}, mode=mode) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        start = time.monotonic()
        with pytest.raises(DownloadError, match=HOSTILE_ERRORS[mode]):
            Phi3(REPO, filename=FILE)
        assert time.monotonic() - start < 10
    cache = hub_env / "hub"
    outside = [p for p in tmp_path.rglob("*") if p != hub_env and p != cache and cache not in p.parents]
    assert outside == []
    assert list(cache.glob("models--*/snapshots/**/*.gguf")) == []
